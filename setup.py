"""Packaging for dfkd: data-free and multi-teacher knowledge distillation."""
from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="dfkd",
    version="0.1.0",
    description="Data-free and multi-teacher knowledge distillation for PyTorch",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dfkd", "dfkd.*", "teachers", "teachers.*", "generators", "generators.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "PyYAML",
        "tqdm",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["dfkd=dfkd.cli:main"]},
)
