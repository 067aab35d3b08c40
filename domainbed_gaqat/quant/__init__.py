"""The quantization core: LSQ fake quantization, range initialisation, the quantization config
and the quantized modules. Imports torch only (no DomainBed, nothing of the plugin)."""
