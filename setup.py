from setuptools import setup

setup(
    name="tinytlm",
    version="0.1.0",
    description="Pre-train and study tiny BERT language models (Gross et al., arXiv 2507.14871)",
    # one top-level package once installed: the repository's kernels/ becomes tinytlm.kernels (the
    # checkout keeps the design's layout; tinytlm.kernel_path finds either). The commands are modules:
    # python -m tinytlm.pretrain | finetune | ensemble | tasks | wikipedia | tokstats | paper | demo
    packages=["tinytlm", "tinytlm.kernels"],
    package_dir={"tinytlm.kernels": "kernels"},
    python_requires=">=3.10",
    # torch is not pinned here: on a CPU-only machine install the CPU wheel first
    # (the README's commands do), otherwise pip would pull a CUDA build.
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "plot": ["matplotlib"],
        "parquet": ["pyarrow"],
        # test-only references: the Hugging Face tokenizer and model. transformers 5.25 requires a
        # package named `kernels`, which this checkout's top-level kernels/ shadows (its import then fails):
        # below 5.25 until that clash is solved.
        "test": ["pytest", "transformers<5.25", "tokenizers", "triton", "pyarrow", "matplotlib"],
    },
)
