"""lustrefuse: a Lustre-like striped namespace over an S3 bucket, served through FUSE."""

__version__ = "0.1.0"
