"""cosched: co-schedule several DNN models as one TVM module."""

from setuptools import setup

setup(
    name="cosched",
    version="0.1.0",
    description="Compile several DNN models into one TVM module and run them co-scheduled",
    python_requires=">=3.10",
    # The design card's layout: the package lives in python/, the passes and the runtime are
    # top-level folders installed as sub-packages.
    package_dir={
        "cosched": "python/cosched",
        "cosched.passes": "passes",
        "cosched.runtime": "runtime",
    },
    packages=["cosched", "cosched.passes", "cosched.runtime"],
    package_data={"cosched.runtime": ["src/*.cc", "src/*.h"]},
    install_requires=[
        "apache-tvm==0.27.0.post1",
        # 0.1.15.x segfaults in JSON serialization, which every MetaSchedule run needs.
        "apache-tvm-ffi==0.1.14.post1",
        "numpy",
        "onnx",
        "xgboost-cpu",
        "cloudpickle",
        "psutil",
        "scipy>=1.15",  # bootstrap(rng=...)
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "onnxruntime", "ruff"],
        "bench": ["onnxruntime", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["cosched=cosched.cli:main"]},
)
