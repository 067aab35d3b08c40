"""The sweep configs of the paper's tables: one literal ``SWEEP = {...}`` per file (see README.md).

Installed with the package as ``domainbed_gaqat.sweeps``; nothing here is imported to read a
config (``ast.literal_eval``)."""
