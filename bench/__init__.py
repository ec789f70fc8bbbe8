"""The memproxy benchmark; run from the repository root, see README.md."""
