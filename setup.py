"""octjepa: retinal OCT DICOM archives -> WebDataset shards -> a V-JEPA2 3D foundation model.

Extras keep each machine lean: Beam/Dataflow workers install ``.[beam]`` (no torch), trainers ``.[train]``,
TPU hosts ``.[train,tpu]``, developers ``.[beam,train,test]``.
"""

from setuptools import find_packages, setup

# What the preprocess and reshard workers import, and nothing else: Dataflow installs this package from its sdist
# (or dataflow/Dockerfile from the source) with install_requires only (no extras), so the DICOM decoders, gcsfs and
# scipy (the resampler's sparse filters) live here, and torch and webdataset (the trainer's loader) do not.
BASE = [
    "numpy>=2.0,<2.5",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
    "pyyaml==6.0.4",
    "pydicom==3.0.2",
    "pylibjpeg==2.1.0",
    "pylibjpeg-openjpeg==2.6.0",
    "pylibjpeg-libjpeg==2.5.0",
    "scipy==1.17.1",
    "google-crc32c==1.9.0",
]
BEAM = ["apache-beam[gcp]==2.77.0"]
TRAIN = [
    "torch==2.9.0",
    "webdataset==1.0.2",
    "wandb==0.31.0",
    "matplotlib==3.11.2",
    "pillow==12.3.0",
    "scikit-learn==1.9.1",
    "psutil==7.2.2",
]
# TPU hosts: the TPU runtime, and jax for torch_xla's Pallas kernels (the flash attention the trainer uses on TPU).
TPU = ["torch_xla[tpu,pallas]==2.9.0"]
TEST = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "ruff==0.17.6",  # lint and format (ruff.toml); .ci/run checks both
    "gcp-storage-emulator==2026.7.19",
    # The static-graph test runs torch_xla on its CPU backend (PJRT_DEVICE=CPU); no TPU runtime needed.
    "torch_xla==2.9.0",
    # The packaging test builds the Dataflow sdist and a wheel from it without build isolation: a new venv's
    # setuptools (65 on Python 3.11) has no bdist_wheel of its own.
    "build==1.6.1",
    "setuptools==84.2.1",
    "wheel==0.48.0",
]

setup(
    name="octjepa",
    version="0.1.0",
    description="Retinal OCT DICOM -> WebDataset shards -> V-JEPA2 3D self-supervised pretraining",
    # 3.10: the stock TPU VM images (tpu-ubuntu2204-base, the v5/v6 runtimes); torch_xla 2.9 ships 3.10-3.12 wheels.
    python_requires=">=3.10,<3.13",
    packages=find_packages(
        include=[
            "shards",
            "shards.*",
            "beam_jobs",
            "beam_jobs.*",
            "model",
            "model.*",
            "trainer",
            "trainer.*",
            "synth",
            "synth.*",
        ]
    ),
    py_modules=["octjepa_cli"],
    install_requires=BASE,
    extras_require={"beam": BEAM, "train": TRAIN, "tpu": TPU, "test": TEST},
    entry_points={"console_scripts": ["octjepa = octjepa_cli:main"]},
)
