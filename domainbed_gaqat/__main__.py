"""``python -m domainbed_gaqat COMMAND``: the ``gaqat`` command line."""

from domainbed_gaqat.cli import gaqat

if __name__ == "__main__":
    gaqat()
