from setuptools import find_packages, setup

setup(
    name="neodragon-npu",
    version="0.1.0",
    description="Graph compiler and operator toolkit: Neodragon PyTorch modules to Hexagon NPU binaries",
    python_requires=">=3.11",
    packages=find_packages(include=["passes*", "kernels*", "graphs*", "neodragon_models*", "tools*"]),
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
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["neodragon-npu=tools.cli:main"]},
)
