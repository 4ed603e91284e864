"""``octjepa reshard``: per-domain shard sets whose samples are exactly the input's, byte for byte."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest

import octjepa_cli
import shards
from beam_jobs import reshard
from beam_jobs.reshard_files import SampleRef, deal, domain_dir, shard_count
from shards import ROOT_INDEX_KIND, lease, storage, verify
from shards.synthetic import make_shard_set

# In-process runner for speed; the CLI test below runs the default one (multi-threading, a worker per core).
FAST = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def run_reshard(source, output, *extra):
    return reshard.run(["--input", str(source), "--output", str(output), *extra, *FAST])


def read_domain_sets(root: str) -> dict[tuple[str, str], dict[str, dict]]:
    """(domain, split) -> {key: record} read back through the index of every domain set of a root."""
    top = json.loads(storage.read_bytes(storage.join(root, shards.INDEX_NAME)))
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for name, entry in top["domains"].items():
        domain_root = storage.join(root, entry["path"])
        index = shards.read_index(domain_root)
        for split in index["splits"]:
            for url in shards.shard_urls(domain_root, index, split):
                with storage.open_url(url) as f:
                    for record in shards.iter_shard(f, name=url):
                        bucket = out.setdefault((name, split), {})
                        assert record["__key__"] not in bucket, f"{record['__key__']} duplicated in {url}"
                        bucket[record["__key__"]] = record
    return out


def expected_groups(samples: dict[str, dict], field: str) -> dict[tuple[str, str], set[str]]:
    groups: dict[tuple[str, str], set[str]] = {}
    for key, record in samples.items():
        meta = json.loads(record["json"])
        groups.setdefault((meta[field], meta["split"]), set()).add(key)
    return groups


def digest(record: dict) -> tuple[str, str]:
    return hashlib.sha256(record["npy"]).hexdigest(), hashlib.sha256(record["json"]).hexdigest()


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("source") / "set"
    index, samples = make_shard_set(str(root), per_device=6, samples_per_shard=3)
    return root, index, samples


@pytest.fixture(scope="module")
def by_device(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("by_device") / "out"
    report = run_reshard(source[0], out, "--samples-per-shard", "2")
    return out, report


# ---------------------------------------------------------------------------------------------- content
def test_no_sample_lost_or_duplicated_per_domain_and_split(source, by_device):
    _, _, samples = source
    out, report = by_device
    got = read_domain_sets(str(out))
    assert {k: set(v) for k, v in got.items()} == expected_groups(samples, "device")
    assert sum(len(v) for v in got.values()) == len(samples)
    assert report["counters"]["samples_written"] == len(samples)


def test_every_sample_names_its_domain_and_splits_are_kept(source, by_device):
    _, _, samples = source
    out, report = by_device
    for (domain, split), records in read_domain_sets(str(out)).items():
        for key, record in records.items():
            meta = json.loads(record["json"])
            assert meta["device"] == domain and meta["split"] == split
            assert json.loads(samples[key]["json"])["split"] == split
    root = report["index"]
    assert root["kind"] == ROOT_INDEX_KIND and root["by"] == "device"
    for name, entry in root["domains"].items():
        index = shards.read_index(str(out / entry["path"]))  # a domain directory is an ordinary shard set
        assert index["counts"]["by_device"] == {name: entry["num_samples"]}
        assert index["counts"]["by_split"] == entry["by_split"]
        assert index["config"]["reshard"]["by"] == "device"
        assert index["selected"] == entry["num_samples"] and index["errors"]["count"] == 0


def test_sample_bytes_are_identical_to_the_input(source, by_device):
    _, _, samples = source
    for records in read_domain_sets(str(by_device[0])).values():
        for key, record in records.items():
            assert digest(record) == digest(samples[key]), key


def test_shards_are_sorted_and_balanced_within_one_sample(by_device):
    out, _ = by_device
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        index = shards.read_index(str(folder))
        for entry in index["splits"].values():
            counts = [s["num_samples"] for s in entry["shards"]]
            assert max(counts) - min(counts) <= 1 and max(counts) <= 2
            for shard in entry["shards"]:
                with open(folder / shard["path"], "rb") as f:
                    keys = [r["__key__"] for r in shards.iter_shard(f)]
                assert keys == sorted(keys)


def test_verify_passes_on_the_output_and_catches_a_flipped_byte(by_device, tmp_path):
    out, report = by_device
    good = verify.verify_shard_set(str(out))
    assert good.ok, good.problems
    assert {r.domain for r in good.rows} == set(report["index"]["domains"])
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("zeiss_cirrus/train/shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[-1030] ^= 0xFF  # last member's data (the tar ends with two 512-byte zero blocks)
    shard.write_bytes(bytes(data))
    bad = verify.verify_shard_set(str(copy))
    assert any(str(shard) in p for p in bad.problems), bad.problems


# ---------------------------------------------------------------------------------------------- determinism
def test_same_input_gives_the_same_bytes_and_reruns_replace_stale_output(source, by_device, tmp_path):
    out, _ = by_device
    again = tmp_path / "again"
    shutil.copytree(out, again)
    stale = again / "topcon_triton" / "train" / "shard-000099.tar"
    stale.write_bytes(b"left over from an earlier run")
    run_reshard(source[0], again, "--samples-per-shard", "2", "--overwrite")
    assert not stale.exists()
    fresh = tmp_path / "fresh"
    run_reshard(source[0], fresh, "--samples-per-shard", "2")
    assert all_files(fresh) == all_files(out) == all_files(again)


# ---------------------------------------------------------------------------------------------- shard counts
@pytest.mark.parametrize(
    "count, per_shard, k, expected",
    [
        (10, 3, 1, 4),
        (10, 3, 4, 4),
        (10, 3, 3, 6),
        (12, 3, 4, 4),
        (13, 3, 4, 8),
        (2, 5, 4, 4),  # fewer samples than K: K shards, two of them empty
        (0, 5, 1, 1),
        (1, 1, 1, 1),
        (7, 100, 8, 8),
    ],
)
def test_shard_count_arithmetic(count, per_shard, k, expected):
    n = shard_count(count, 0, per_shard, k)
    assert n == expected and n % k == 0
    dealt = deal([_ref(f"k{i:03d}") for i in range(count)], n)
    sizes = [len(s) for s in dealt]
    assert len(dealt) == n and sum(sizes) == count and max(sizes) - min(sizes) <= 1


def test_shard_count_by_bytes_when_samples_per_shard_is_not_given():
    target = shards.TARGET_SHARD_BYTES
    assert shard_count(10, 3 * target, None, 1) == 3
    assert shard_count(10, 3 * target + 1, None, 2) == 4
    assert shard_count(1, 10, None, 1) == 1


def _ref(key):
    return SampleRef(key, "d", "train", "d", "u", 0, 1, b"{}", b"{}")


def test_deal_refuses_a_duplicated_key():
    with pytest.raises(shards.ContractError, match="k1 appears twice"):
        deal([_ref("k1"), _ref("k0"), _ref("k1")], 2)


@pytest.mark.parametrize("by, per_shard, k", [("laterality", "3", "4"), ("anatomic_region", "1", "5")])
def test_shards_multiple_of_gives_balanced_splits(source, tmp_path, by, per_shard, k):
    _, _, samples = source
    out = tmp_path / "out"
    report = run_reshard(source[0], out, "--by", by, "--samples-per-shard", per_shard, "--shards-multiple-of", k)
    groups = expected_groups(samples, by)
    assert {(d, s): set(r) for (d, s), r in read_domain_sets(str(out)).items()} == groups
    for name, entry in report["index"]["domains"].items():
        index = shards.read_index(str(out / entry["path"]))
        for split, split_entry in index["splits"].items():
            counts = [s["num_samples"] for s in split_entry["shards"]]
            n = math.ceil(math.ceil(len(groups[(name, split)]) / int(per_shard)) / int(k)) * int(k)
            assert len(counts) == n and max(counts) - min(counts) <= 1


def test_single_domain_with_fewer_samples_than_k(source, tmp_path):
    _, _, samples = source
    out = tmp_path / "triton"
    report = run_reshard(source[0], out, "--domains", "topcon_triton", "--shards-multiple-of", "4")
    assert list(report["index"]["domains"]) == ["topcon_triton"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "topcon_triton"]
    index = shards.read_index(str(out / "topcon_triton"))
    for entry in index["splits"].values():
        assert sorted(s["num_samples"] for s in entry["shards"]) == [0, 0, 1, 1]  # 2 samples dealt to 4 shards
    assert verify.verify_shard_set(str(out)).ok
    triton = {k for k, r in samples.items() if json.loads(r["json"])["device"] == "topcon_triton"}
    assert {k for recs in read_domain_sets(str(out)).values() for k in recs} == triton


def test_a_requested_domain_without_samples_fails_without_a_root_index(source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(shards.ContractError, match="topcon_trition"):
        run_reshard(source[0], out, "--domains", "topcon_triton,topcon_trition")
    assert not (out / shards.INDEX_NAME).exists()


# ---------------------------------------------------------------------------------------------- bad input
def _first_volume_offset(path: Path) -> int:
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("." + shards.VOLUME_EXT))
        return member.offset_data + member.size - 1


@pytest.mark.parametrize("damage", ["flip_volume_byte", "truncate", "garbage"])
def test_a_corrupt_or_truncated_input_shard_fails_the_job_naming_it(source, tmp_path, damage, capsys):
    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    shard = src / "val" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    if damage == "flip_volume_byte":
        data[_first_volume_offset(shard)] ^= 0x01  # the tar still parses: only the checksum can tell
    elif damage == "truncate":
        data = data[: len(data) // 2 // 512 * 512]  # on a block boundary: a tar reader alone sees a clean end
    else:
        data[:512] = b"\x07" * 512
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(shards.ContractError, match=str(shard)):
        run_reshard(src, out)
    assert not (out / shards.INDEX_NAME).exists()
    assert not list(out.glob(f"*/{shards.INDEX_NAME}"))
    assert octjepa_cli.main(["reshard", "--input", str(src), "--output", str(out), *FAST]) == 1
    assert str(shard) in capsys.readouterr().err
    if damage == "flip_volume_byte":  # the default local runner re-raises a worker's error as a RuntimeError
        assert octjepa_cli.main(["reshard", "--input", str(src), "--output", str(out)]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the runner's own log of the failure
        assert last.startswith(f"octjepa reshard: {shard}: source shard is corrupt")


def test_every_source_shard_is_checked_even_one_without_a_kept_sample(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    shard = src / "train" / "shard-000002.tar"  # zeiss_cirrus samples only
    with open(shard, "rb") as f:
        assert {json.loads(r["json"])["device"] for r in shards.iter_shard(f)} == {"zeiss_cirrus"}
    good = run_reshard(src, tmp_path / "good", "--domains", "topcon_triton")
    assert (
        good["counters"]["source_shards_checked"]
        == good["counters"]["source_shards_scanned"]
        == sum(len(e["shards"]) for e in source[1]["splits"].values())
    )
    data = bytearray(shard.read_bytes())
    data[_first_volume_offset(shard)] ^= 0x01
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(shards.ContractError, match=str(shard)):
        run_reshard(src, out, "--domains", "topcon_triton")
    assert not (out / shards.INDEX_NAME).exists() and not list(out.glob(f"*/{shards.INDEX_NAME}"))


def test_a_source_set_without_shards_gives_a_root_without_domains(tmp_path):
    src = tmp_path / "empty"
    make_shard_set(str(src), per_device=0)
    report = run_reshard(src, tmp_path / "out")
    assert report["index"]["domains"] == {} and verify.verify_shard_set(str(tmp_path / "out")).ok
    with pytest.raises(shards.ContractError, match="topcon_triton"):
        run_reshard(src, tmp_path / "out2", "--domains", "topcon_triton")
    assert not (tmp_path / "out2" / shards.INDEX_NAME).exists()


def test_input_without_index_is_refused(source, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(source[0], src)
    (src / shards.INDEX_NAME).unlink()
    assert octjepa_cli.main(["reshard", "--input", str(src), "--output", str(tmp_path / "out"), *FAST]) == 1
    assert "no index.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_resharded_root_is_refused_as_input_but_its_domain_sets_are_not(by_device, tmp_path, capsys):
    out, _ = by_device
    assert octjepa_cli.main(["reshard", "--input", str(out), "--output", str(tmp_path / "x"), *FAST]) == 1
    assert "re-sharded root" in capsys.readouterr().err
    again = run_reshard(out / "zeiss_cirrus", tmp_path / "lat", "--by", "laterality")
    assert (
        sum(d["num_samples"] for d in again["index"]["domains"].values())
        == shards.read_index(str(out / "zeiss_cirrus"))["counts"]["by_device"]["zeiss_cirrus"]
    )


def test_bad_options_are_refused(source, tmp_path, capsys):
    assert (
        octjepa_cli.main(["reshard", "--input", str(source[0]), "--output", str(tmp_path), "--shards-multiple-of", "0"])
        == 2
    )
    assert "--shards-multiple-of" in capsys.readouterr().err
    assert octjepa_cli.main(["reshard", "--input", str(source[0]), "--output", str(source[0])]) == 2


def test_local_runs_default_to_threads_and_dataflow_gets_the_preprocessing_flags():
    from apache_beam.options.pipeline_options import DirectOptions, SetupOptions

    assert reshard.pipeline_options([]).view_as(DirectOptions).direct_running_mode == "multi_threading"
    given = reshard.pipeline_options(["--direct_running_mode=multi_processing"])
    assert given.view_as(DirectOptions).direct_running_mode == "multi_processing"
    dataflow = reshard.pipeline_options(
        ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"]
    )
    assert dataflow.view_as(SetupOptions).setup_file.endswith("setup.py")


def test_domain_directories_are_path_safe_and_distinct():
    names = ["topcon_triton", "Optic Disc", "a/b", "a%2Fb", "L"]
    dirs = [domain_dir(n) for n in names]
    assert dirs[0] == "topcon_triton" and all("/" not in d and " " not in d for d in dirs)
    assert len(set(dirs)) == len(dirs)
    for bad in ["", ".", ".."]:
        with pytest.raises(shards.ContractError):
            domain_dir(bad)


# ---------------------------------------------------------------------------------------------- gs:// and the CLI
def test_gcs_in_and_out_through_the_emulator(source, gcs):
    root, _, samples = source
    fs, bucket = storage.get_fs(gcs)
    src = storage.join(gcs, "in")
    fs.put(str(root), bucket + "/in", recursive=True)
    fs.invalidate_cache()
    out = storage.join(gcs, "out")
    report = run_reshard(src, out, "--domains", "zeiss_cirrus,heidelberg_spectralis")
    assert sorted(report["index"]["domains"]) == ["heidelberg_spectralis", "zeiss_cirrus"]
    got = read_domain_sets(out)
    wanted = {
        g: keys
        for g, keys in expected_groups(samples, "device").items()
        if g[0] in ("zeiss_cirrus", "heidelberg_spectralis")
    }
    assert {g: set(r) for g, r in got.items()} == wanted
    for records in got.values():
        for key, record in records.items():
            assert digest(record) == digest(samples[key])
    assert verify.verify_shard_set(out).ok

    run_reshard(src, out, "--domains", "topcon_triton", "--overwrite")  # the earlier domains go
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(bucket + "/out")) == ["index.json", "topcon_triton"]
    assert verify.verify_shard_set(out).ok


def test_cli_with_the_default_local_runner(source, tmp_path, capsys):
    _, _, samples = source
    out = tmp_path / "out"
    assert (
        octjepa_cli.main(["reshard", "--input", str(source[0]), "--output", str(out), "--by", "anatomic_region"]) == 0
    )
    assert "reshard by anatomic_region" in capsys.readouterr().out
    got = read_domain_sets(str(out))
    assert {g: set(r) for g, r in got.items()} == expected_groups(samples, "anatomic_region")
    assert octjepa_cli.main(["verify", str(out)]) == 0
    assert {d for d, _ in got} == {"macula", "optic_disc"}


# ---------------------------------------------------------------------------------------------- where it may write
def test_an_output_equal_to_inside_or_above_the_input_is_refused_before_anything_is_deleted(source, tmp_path, capsys):
    src = tmp_path / "sets" / "zeiss_cirrus"  # named like a domain: --output sets/ would write over it
    shutil.copytree(source[0], src)
    before = all_files(tmp_path)
    for output, relation in (
        (src, "is"),
        (src / "by_device", "is inside"),
        (tmp_path / "sets", "is a parent of"),
        (tmp_path, "is a parent of"),
    ):
        assert octjepa_cli.main(["reshard", "--input", str(src), "--output", str(output), *FAST]) == 2
        err = capsys.readouterr().err
        assert f"--output {output} {relation} --input {src}" in err and err.count("\n") == 1, err
        assert all_files(tmp_path) == before


def test_a_complete_output_is_replaced_only_with_overwrite_and_no_earlier_domain_is_left(
    source, by_device, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(by_device[0], out)
    (out / "notes").mkdir()
    (out / "notes" / "readme.txt").write_text("not reshard's")
    (out / "zeiss_cirrus" / "notes.txt").write_text("not reshard's either")
    before = all_files(out)
    assert (
        octjepa_cli.main(["reshard", "--input", str(source[0]), "--output", str(out), "--by", "laterality", *FAST]) == 2
    )
    assert "already holds a complete set" in capsys.readouterr().err and all_files(out) == before

    report = run_reshard(source[0], out, "--by", "laterality", "--overwrite")
    domains = sorted(entry["path"] for entry in report["index"]["domains"].values())
    assert domains == ["L", "R"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["index.json", "notes", "zeiss_cirrus", *domains])
    assert [p.name for p in (out / "zeiss_cirrus").rglob("*")] == ["notes.txt"]  # the rest of it is gone
    assert (out / "notes" / "readme.txt").exists()
    assert verify.verify_shard_set(str(out)).ok


def test_an_interrupted_earlier_run_needs_no_overwrite_and_leaves_no_domain(source, by_device, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(by_device[0], out)
    (out / shards.INDEX_NAME).unlink()  # killed before its root index: no complete set there
    report = run_reshard(source[0], out, "--by", "anatomic_region")
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "macula", "optic_disc"]
    assert sorted(report["index"]["domains"]) == ["macula", "optic_disc"]


def test_an_output_holding_a_set_reshard_did_not_write_is_refused(source, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(source[0], out / "mine")  # a complete preprocessed set one level down
    before = all_files(out)
    assert octjepa_cli.main(["reshard", "--input", str(source[0]), "--output", str(out), "--overwrite", *FAST]) == 2
    assert "holds shard set(s) not written by octjepa reshard (mine)" in capsys.readouterr().err
    assert all_files(out) == before
    shutil.copytree(source[0], tmp_path / "plain")  # and a plain set at the top
    assert (
        octjepa_cli.main(
            ["reshard", "--input", str(source[0]), "--output", str(tmp_path / "plain"), "--overwrite", *FAST]
        )
        == 2
    )
    assert "holds a shard set, not a re-sharded root" in capsys.readouterr().err


def test_reshard_takes_the_output_lease(source, by_device, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(by_device[0], out)
    before = all_files(out)
    with lease.hold(str(out), job="reshard"):
        assert octjepa_cli.main(["reshard", "--input", str(source[0]), "--output", str(out), "--overwrite", *FAST]) == 1
        assert "is being written by octjepa reshard on" in capsys.readouterr().err
    assert all_files(out) == before
