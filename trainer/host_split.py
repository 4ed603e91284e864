"""Which shards each host and each loader worker reads in an epoch: pure, deterministic list arithmetic.

Every host computes the same epoch permutation from (seed, epoch) alone, then takes its own slice by host
index/count; webdataset's ``split_by_node`` reads torch.distributed's rank, which TPU hosts under torch_xla do
not set, so the split is done here explicitly. A host whose slice holds too few samples for the epoch's fixed
step count is topped up with shards resampled from the whole split (deterministically from seed/epoch/host):
every host must run exactly the same number of steps, or a pod hangs at the first collective one host skips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards import stable_hash


@dataclass(frozen=True)
class Shard:
    """A shard as ``index.json`` lists it: the loader checks the file against its size and sample count."""

    url: str
    num_samples: int
    bytes: int


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, identical in every process (for numpy, random and torch generators)."""
    return stable_hash("/".join(str(p) for p in parts)) & (2**63 - 1)


def epoch_order(shards: list[Shard], *, seed: int, epoch: int) -> list[Shard]:
    """The epoch's shard permutation; the same on every host because it depends on (seed, epoch) only."""
    perm = np.random.default_rng(derive_seed("epoch-order", seed, epoch)).permutation(len(shards))
    return [shards[i] for i in perm]


def host_shards(
    ordered: list[Shard], *, host_index: int, host_count: int, min_samples: int, seed: int, epoch: int
) -> list[Shard]:
    """This host's slice of the ordered shards, topped up with resampled shards until it holds ``min_samples``."""
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index {host_index} is outside [0, host_count={host_count})")
    if not ordered or sum(s.num_samples for s in ordered) <= 0:
        raise ValueError("cannot split an empty shard list across hosts (the split holds no samples)")
    # Draw the top-up from the whole split, not the host's own slice: a host with one short shard would
    # otherwise repeat that shard's few samples for the whole epoch.
    rng = np.random.default_rng(derive_seed("host-topup", seed, epoch, host_index))
    return top_up(list(ordered[host_index::host_count]), pool=ordered, min_samples=min_samples, rng=rng)


def top_up(shards: list[Shard], *, pool: list[Shard], min_samples: int, rng: np.random.Generator) -> list[Shard]:
    """``shards`` plus shards drawn uniformly from ``pool`` until they hold at least ``min_samples`` samples."""
    out = list(shards)
    while sum(s.num_samples for s in out) < min_samples:
        out.append(pool[int(rng.integers(len(pool)))])
    return out


def worker_quota(num_batches: int, *, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` yields so the workers together yield exactly ``num_batches``.

    Lower-numbered workers take the remainder: the DataLoader asks workers in turn, so the stream stays
    round-robin until the last batch.
    """
    return num_batches // num_workers + (1 if worker < num_batches % num_workers else 0)


def worker_shards(
    host_list: list[Shard], *, worker: int, num_workers: int, min_samples: int, seed: int, stream: tuple
) -> list[Shard]:
    """This worker's share of the host's shards, topped up from the host's list to ``min_samples``."""
    rng = np.random.default_rng(derive_seed("worker-topup", seed, *stream, worker))
    return top_up(host_list[worker::num_workers], pool=host_list, min_samples=min_samples, rng=rng)


def cycle_rounds(shards: list[Shard], *, seed: int, stream: tuple[object, ...], shuffle: bool):
    """Yield ``(round, shard)`` forever: the list as given, then reshuffled rounds (if ``shuffle``).

    A worker's stream never runs dry before its batch quota, whatever decode failures cost it.
    """
    round_no = 0
    order = list(shards)
    while True:
        for shard in order:
            yield round_no, shard
        round_no += 1
        if shuffle:
            perm = np.random.default_rng(derive_seed("round", seed, *stream, round_no)).permutation(len(shards))
            order = [shards[i] for i in perm]
