"""tr_align: Trust Region preference alignment (TR-DPO / TR-IPO / TR-KTO) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="tr_align",
    version="0.1.0",
    description=(
        "JAX/Flax Trust Region preference alignment (TR-DPO/TR-IPO/TR-KTO, "
        "Gorbatovski et al. 2024, arXiv:2404.09656)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tr_align", "tr_align.*"]),
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "chex>=0.1.90",
        "grain>=0.2.18",
        "ml-collections>=1.1",
        "absl-py>=2.1",
        "numpy>=2.0",
        "tqdm>=4.66",
        "matplotlib>=3.9",
        "tensorboardX>=2.6",
        "safetensors>=0.6",
        "gguf>=0.17",
        "transformers>=5,<6",  # tokenizers and chat templates only; torch is not needed
        "jinja2>=3.1",  # chat templates (transformers does not require it)
        "datasets>=3.0",  # local JSON/JSONL/Parquet files and hub datasets (tr_align/data/sources.py)
        "pyyaml>=6",  # --trl-config: TRL's DPOConfig/KTOConfig YAML (tr_align/trl_config.py)
    ],
    extras_require={
        # data.source="tfds": read TFDS datasets through tfds.data_source (array_record), no TensorFlow
        "tfds": ["tensorflow-datasets>=4.9.6"],
        # tr-align frontier: the movie-review corpus (gensim's test data) and the gold reward
        "frontier": ["gensim>=4.3", "vaderSentiment>=3.3"],
        # logging.wandb=True: metrics to Weights & Biases too (imported only when enabled)
        "wandb": ["wandb>=0.19"],
        # benchmarks/compare_trl.py's TRL side (benchmarks/trl_runner.py), pinned to the versions
        # the comparison was measured with. CPU torch: pip resolves torch==2.13.0 to a CUDA build
        # on Linux unless given the CPU index, e.g.
        #   pip install -e '.[bench]' --extra-index-url https://download.pytorch.org/whl/cpu
        # (or keep TRL in a venv of its own and pass --trl-python; see benchmarks/README.md)
        "bench": [
            "torch==2.13.0",
            "trl==1.16.0",
            "transformers==5.23.0",
            "datasets==5.2.0",
            "accelerate==1.15.0",
            "tokenizers==0.23.3",
        ],
        # tr-align plan --gpu=...: XLA:GPU compiles for a described card without a GPU. The
        # plugin must match jax's version exactly (jax pins jaxlib the same way); no CUDA
        # libraries are needed to compile-only. Keep it out of a venv that runs anything
        # else on a machine without a GPU: the plugin reports a missing CUDA at every jax start
        # that does not set JAX_PLATFORMS=cpu (tr-align plan sets it).
        "plan-gpu": ["jax-cuda12-plugin>=0.10,<0.11", "jax-cuda12-pjrt>=0.10,<0.11"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",  # tests/test_fuzz.py
            "tensorflow-datasets>=4.9.6",
            "gensim>=4.3",
            "vaderSentiment>=3.3",
            # tests/test_wandb.py (offline); ~20 MB wheel, ~65 MB installed with its deps
            "wandb>=0.19",
        ],
    },
    entry_points={"console_scripts": ["tr-align=tr_align.cli:main"]},
)
