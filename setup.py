from setuptools import find_packages, setup

setup(
    name="guided_diffusion",
    version="0.1.0",
    description=(
        "AnoFPDM weakly-supervised brain-MRI anomaly segmentation with classifier-free "
        "guided diffusion and the HAE UNet family (upstream-checkpoint compatible)."
    ),
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "scipy",
        "nibabel",
        "blobfile",
        "tqdm",
        "scikit-learn",
        "pillow",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "demo": ["nilearn"],
        "test": ["pytest"],
        "mutation": ["mutmut>=3.8,<4"],  # bench/mutation.py
    },
)
