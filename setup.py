"""Install mtlface_fast. The Triton kernels in kernels/ ship inside the package as ``mtlface_fast.kernels``."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version():
    with open(os.path.join(HERE, "mtlface_fast", "__init__.py")) as fh:
        return re.search(r'^__version__ = "([^"]+)"', fh.read(), re.M).group(1)


def long_description():
    path = os.path.join(HERE, "README.md")
    return open(path, encoding="utf-8").read() if os.path.isfile(path) else ""


packages = find_packages(include=["mtlface_fast", "mtlface_fast.*"]) + ["mtlface_fast.kernels"]

setup(
    name="mtlface-fast",
    version=version(),
    description="Fast, exact and deployable MTLFace: age-invariant face recognition and face age synthesis "
                "with fused Triton kernels",
    long_description=long_description(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"mtlface_fast.kernels": "kernels"},
    include_package_data=False,
    install_requires=[
        "torch>=2.4,<2.15",
        "numpy",
        "Pillow>=10.1",  # ImageFont.load_default(size=...): the grids' TrueType label font
        "tqdm",
        "nvtx",
        "safetensors",
        "scikit-image",  # the demo's default face (bundled sample data, no download)
    ],
    extras_require={
        # CI tests the real face detector, so the test extra holds the align extra's package. facenet-pytorch
        # requires an unversioned torchvision, and pip would pick the newest, which pins a newer torch and
        # replaces the installed one; torchvision 0.28 is the release for the torch that .ci/run installs
        # (2.13): bump the two together. (Over the CPU build of torch this torchvision cannot be imported;
        # mtlface_fast.mtcnn then runs facenet-pytorch's networks and weights with plain torch.)
        # The Triton kernels run on CUDA tensors only. CUDA builds of torch bring their own matching triton,
        # so a CPU install needs none; the test suite runs the kernels in the Triton interpreter on CPU.
        # triton range: every kernel specialization of the public calls compiles for sm_90 (bench/
        # compile_range.py) and the kernel test files pass in the interpreter under triton 3.6.0 (torch 2.11's),
        # 3.7.1, 3.8.0 and 3.9.0 (bench/README_compile_range.md); older releases are untested. triton 3.6's
        # interpreter needs numpy < 2.4 (it converts 1-element arrays with int()); 3.8 and later do not.
        "test": ["pytest", "onnx", "onnxruntime", "onnxscript", "PyYAML", "facenet-pytorch>=2.5.3,!=2.6.*",
                 "torchvision<0.29", "triton>=3.6,<3.10; platform_system == 'Linux'",
                 "ray[serve,data]", "faiss-cpu", "tritonclient[grpc]"],
        # photo -> aligned face: MTCNN and its weights (shipped in the wheel); 2.6.x pins torch<2.3 and numpy<2
        "align": ["facenet-pytorch>=2.5.3,!=2.6.*"],
        "triton": ["triton>=3.6,<3.10; platform_system == 'Linux'"],  # the tested range, as "test" above
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "trt": ["torch-tensorrt"],
        # beyond one machine: FAISS galleries (index/search), Ray Data (run --engine ray), Ray Serve (serve),
        # Triton Inference Server repositories (export --target triton-repo: ONNX files; tritonclient's
        # model_config_pb2 checks the config.pbtxt files). The face detector comes with the align extra.
        "scale": ["ray[serve,data]", "faiss-cpu", "tritonclient[grpc]", "onnx", "onnxruntime", "onnxscript",
                  "facenet-pytorch>=2.5.3,!=2.6.*"],
    },
    entry_points={"console_scripts": ["mtlface-fast = mtlface_fast.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
)
