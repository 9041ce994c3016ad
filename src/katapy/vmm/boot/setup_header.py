"""The x86 real-mode kernel header ("setup header"), Documentation/arch/x86/boot.rst,
"The Real-Mode Kernel Header"; its place in struct boot_params is in
Documentation/arch/x86/zero-page.rst (offset 0x1f1).

Offsets below are offsets into the bzImage file, which equal offsets into
the zero page.  Only the fields katapy reads or writes are named.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

SETUP_HEADER_START = 0x1F1
SETUP_HEADER_END = 0x280  # generous upper bound; the real end is 0x202 + the byte at 0x201

# offset: (struct format, name)
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260

BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
LOADER_TYPE_UNDEFINED = 0xFF
LOADFLAG_LOADED_HIGH = 1 << 0
LOADFLAG_CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # protocol < 2.03
MIN_VERSION_64BIT_ENTRY = 0x020C  # xloadflags appeared in 2.12


class SetupHeaderError(ValueError):
    """The image has no valid Linux x86 boot header."""


@dataclass
class SetupHeader:
    setup_sects: int
    version: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    raw: bytes  # bytes 0x1f1 .. end of header, as in the image

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel (boot sector included)."""
        return ((self.setup_sects or 4) + 1) * 512

    @classmethod
    def parse(cls, image: bytes) -> "SetupHeader":
        if len(image) < 0x264:
            raise SetupHeaderError("image too short for a Linux boot header")
        (boot_flag,) = struct.unpack_from("<H", image, OFF_BOOT_FLAG)
        (magic,) = struct.unpack_from("<I", image, OFF_HEADER)
        if boot_flag != BOOT_FLAG or magic != HDRS_MAGIC:
            raise SetupHeaderError("not a bzImage: boot_flag/HdrS magic missing")
        (version,) = struct.unpack_from("<H", image, OFF_VERSION)
        if version < 0x0206:
            raise SetupHeaderError(f"boot protocol {version >> 8}.{version & 0xff:02d} is older than 2.06")

        def u(fmt: str, off: int) -> int:
            return struct.unpack_from(fmt, image, off)[0]

        end = 0x202 + image[0x201]  # the jump at 0x200 skips exactly the header
        end = min(end, SETUP_HEADER_END)
        return cls(
            setup_sects=image[OFF_SETUP_SECTS],
            version=version,
            loadflags=image[OFF_LOADFLAGS],
            code32_start=u("<I", OFF_CODE32_START),
            initrd_addr_max=u("<I", OFF_INITRD_ADDR_MAX) if version >= 0x0203 else DEFAULT_INITRD_ADDR_MAX,
            kernel_alignment=u("<I", OFF_KERNEL_ALIGNMENT),
            relocatable=bool(image[OFF_RELOCATABLE]),
            xloadflags=u("<H", OFF_XLOADFLAGS) if version >= MIN_VERSION_64BIT_ENTRY else 0,
            cmdline_size=u("<I", OFF_CMDLINE_SIZE) if version >= 0x0206 else 255,
            pref_address=u("<Q", OFF_PREF_ADDRESS) if version >= 0x020A else 0,
            init_size=u("<I", OFF_INIT_SIZE) if version >= 0x020A else 0,
            raw=bytes(image[SETUP_HEADER_START:end]),
        )
