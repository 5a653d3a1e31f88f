"""Packaging for clusmar_beam; also used as Beam's --setup_file for remote workers."""
import setuptools

REQUIRED = [
    "apache-beam[gcp]>=2.77.0,<2.78",
    "tensorflow-cpu>=2.21.0,<2.22",
    "faiss-cpu>=1.15.1,<1.16",
    "pyarrow>=18",
    "numpy>=1.26",
    "scipy>=1.13",
    "pyyaml>=6",
    "scikit-learn>=1.5",   # clusmar simulate: logistic regression, digits
    "matplotlib>=3.8",     # clusmar report: plots embedded in one HTML file
]

EXTRAS = {
    "test": ["pytest>=8", "fastcluster>=1.2"],
    "bench": ["fastcluster>=1.2"],
}

setuptools.setup(
    name="clusmar_beam",
    version="0.1.0",
    description="Cluster-Margin batch active learning (Citovsky et al., 2021) on Apache Beam",
    packages=setuptools.find_packages(include=["clusmar_beam", "clusmar_beam.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=REQUIRED,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["clusmar = clusmar_beam.app.cli:main"]},
)
