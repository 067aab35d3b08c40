"""The optimisation core: the SAGM step and GAQAT's gradient disorder and freezing rule.
Imports torch only (no DomainBed, nothing of the plugin)."""
