"""Integer export of quantized params: codes packed into bytes, scales and zero points, orbax I/O.

    q_params, report, grids = qjax.gptq(..., return_grids=True)   # or gpfq, quantize_rtn
    packed = export.pack(q_params, grids)        # grids: {layer name: Grid or 1-D levels}
    export.unpack(packed) == q_params            # exactly
    export.save(path, packed); export.restore(path)  # orbax-checkpoint
    export.report(packed)                        # bytes per layer, against float32

One module per job:

  codes       the packed leaf: `Packed` (uint8 codes plus scales and zero points, or a level
              table), `ActQuant` (the layer input's quantizer), `is_packed`; the bit packing
              `pack_codes`, `unpack_codes`, `container_bits`
  packing     params to packed leaves and back: `pack`, `unpack`, `pack_kernel`, `act_rules`
  accounting  `report`: bytes per layer against float32, counted as the ALQ report counts
  checkpoint  orbax-checkpoint `save` / `restore` (layout `FORMAT_VERSION`, a CRC-32 per packed
              leaf), `disk_bytes`
"""
from qjax.export.accounting import report
from qjax.export.checkpoint import FORMAT_VERSION, disk_bytes, restore, save
from qjax.export.codes import (ActQuant, Packed, container_bits, is_packed, pack_codes,
                               unpack_codes)
from qjax.export.packing import act_rules, pack, pack_kernel, unpack

__all__ = ["pack", "unpack", "save", "restore", "report", "pack_kernel", "act_rules", "Packed",
           "ActQuant", "is_packed", "pack_codes", "unpack_codes", "container_bits",
           "FORMAT_VERSION", "disk_bytes"]
