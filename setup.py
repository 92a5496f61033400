"""The project's folders (passes/, kernels/, graphs/, neodragon_models/, tools/) install as
sub-packages of one namespace, ``neodragon_npu``: their plain names are taken on PyPI
(Hugging Face's ``kernels``, which transformers imports, among them), so none of them is
installed, or importable from the checkout, as a top-level package of its own."""

import os

from setuptools import setup

NAMESPACE = "neodragon_npu"
FOLDERS = ("passes", "kernels", "graphs", "neodragon_models", "tools")


def packages(folder: str) -> list[str]:
    found = []
    for root, dirs, _files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        found.append(f"{NAMESPACE}.{root.replace(os.sep, '.')}")
    return found


setup(
    name="neodragon-npu",
    version="0.2.0",
    description="Graph compiler and operator toolkit: Neodragon PyTorch modules to Hexagon NPU binaries",
    python_requires=">=3.11",
    packages=[p for folder in FOLDERS for p in packages(folder)],
    package_dir={f"{NAMESPACE}.{folder}": folder for folder in FOLDERS},
    # torch is pinned to 2.13.0 (CPU) by constraints.txt and installed first by the Makefile:
    # an open range with no torch installed pulls a multi-GB CUDA build.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "onnx>=1.17",
        "onnx-ir>=0.1.16",
        "onnxscript>=0.4",
        "onnx-graphsurgeon",
        "onnxruntime>=1.24.2",
        "onnxruntime-qnn>=2.7",
        "aimet-onnx>=2.42",
        "networkx>=3",
        "scipy",
        "qai-hub",
        "safetensors",
        "matplotlib",
        "psutil",
        "threadpoolctl",
        "transformers>=5",
        "diffusers>=0.40",
        "jsonschema>=4",  # the bundle manifest's schema (tools/runtime/schema.py)
        "imageio-ffmpeg",  # an ffmpeg binary, for generate's MP4
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["neodragon-npu=neodragon_npu.tools.cli:main"]},
)
