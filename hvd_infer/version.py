"""The package version, in one place: setup.cfg and hvd_infer.__version__ read it from here."""
__version__ = "0.2.0"
