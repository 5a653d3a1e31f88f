"""Packaging for clusmar_beam; also used as Beam's --setup_file for remote workers."""
import setuptools

BEAM_PIN = ">=2.77.0,<2.78"
REQUIRED = [
    "apache-beam[gcp]" + BEAM_PIN,
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
    # File systems beyond gs:// and local ones (every file goes through Beam's FileSystems).
    "aws": ["apache-beam[aws]" + BEAM_PIN],        # s3://
    "azure": ["apache-beam[azure]" + BEAM_PIN],    # azfs://
    "hadoop": ["apache-beam[hadoop]" + BEAM_PIN],  # hdfs://
    # moto's S3-compatible server: tests run rounds on s3:// without a network.
    "test": ["pytest>=8", "fastcluster>=1.2", "apache-beam[aws]" + BEAM_PIN, "moto[server]>=5"],
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
