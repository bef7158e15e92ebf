"""The smallest guest that writes to its disk: a 512-byte boot sector.

Test VMs have no operating system, and writes injected with qemu-io through
QEMU's monitor bypass the drive's error policy. A real guest write goes
through virtio-blk and is subject to error_policy='stop': when it fails (e.g.
ENOSPC on the storage) QEMU pauses the VM with an I/O error, as in production.

SeaBIOS loads sector 0 of the first disk at 0000:7C00 and jumps to it with
DL = the BIOS drive number. The program below then writes for ever:

- INT 13h AH=48h asks for the disk size in sectors (if the BIOS refuses,
  the size stays 0xFFFFFFFF and the end of the disk shows up as a failed
  write instead);
- a 32 KiB buffer at 1000:0000 is filled with PATTERN;
- INT 13h AH=43h (extended write, disk address packet) writes SECTORS_PER_CALL
  sectors at a time, from FIRST_LBA up to the end of the disk, then starts
  again at FIRST_LBA. The first 32 KiB (the boot sector) are never written,
  so the volume stays bootable.

The machine code is hand-assembled here (16-bit real mode, every instruction
commented); the bytes are deterministic and need no assembler.
"""
from __future__ import annotations

import os
import struct
import subprocess
import tempfile

from vmhost.storage import qemu_img

SECTOR = 512
PATTERN = 0xA5                 # every byte the guest writes
SECTORS_PER_CALL = 64          # 32 KiB per INT 13h call
FIRST_LBA = 64                 # the first 32 KiB hold the boot sector: never written
BUFFER_SEGMENT = 0x1000        # the write buffer: linear 0x10000..0x17FFF
PARAMS_BUFFER = 0x0600         # INT 13h AH=48h result (free low memory)
LOAD_ADDRESS = 0x7C00


def _rel8(source_end: int, target: int) -> bytes:
    """A short jump's displacement, from the end of the jump instruction."""
    disp = target - source_end
    assert -128 <= disp <= 127, f"short jump out of range: {disp}"
    return struct.pack("<b", disp)


def _assemble(labels: dict[str, int]) -> tuple[bytes, dict[str, int]]:
    """One pass: machine code laid out from offset 0 with the given label
    values (absolute addresses); returns it and the labels it defined."""
    code = bytearray()
    found: dict[str, int] = {}

    def here() -> int:
        return LOAD_ADDRESS + len(code)

    def label(name: str) -> None:
        found[name] = here()

    def emit(*parts: bytes | int) -> None:
        for p in parts:
            code.extend(bytes([p]) if isinstance(p, int) else p)

    def addr(name: str) -> bytes:               # a 16-bit absolute address (DS = 0)
        return struct.pack("<H", labels.get(name, 0))

    def jump(opcode: int, name: str) -> None:   # a 2-byte short (conditional) jump
        emit(opcode, _rel8(here() + 2, labels.get(name, here() + 2)))

    # --- set up: segments, stack, remember the boot drive -------------------
    emit(0xFA)                                  # cli                     ; no interrupts while SS:SP change
    emit(0x31, 0xC0)                            # xor ax, ax              ; ax = 0
    emit(0x8E, 0xD8)                            # mov ds, ax              ; DS = 0: data at absolute addresses
    emit(0x8E, 0xD0)                            # mov ss, ax              ; SS = 0
    emit(0xBC, struct.pack("<H", LOAD_ADDRESS))  # mov sp, 0x7C00         ; stack grows down below the code
    emit(0xFB)                                  # sti                     ; the BIOS needs its interrupts
    emit(0xFC)                                  # cld                     ; string operations go up
    emit(0x88, 0x16, addr("drive"))             # mov [drive], dl         ; the drive the BIOS booted from

    # --- disk size: INT 13h AH=48h (extended get drive parameters) ----------
    emit(0xBE, struct.pack("<H", PARAMS_BUFFER))  # mov si, 0x0600        ; DS:SI = result buffer
    emit(0xC7, 0x04, struct.pack("<H", 0x1A))   # mov word [si], 0x1A     ; buffer size (EDD 1.x: 26 bytes)
    emit(0xB4, 0x48)                            # mov ah, 0x48            ; function 48h; DL = drive still
    emit(0xCD, 0x13)                            # int 0x13                ; fills the buffer, CF = error
    jump(0x72, "fill")                          # jc fill                 ; refused: keep size 0xFFFFFFFF
    emit(0x66, 0x8B, 0x44, 0x10)                # mov eax, [si+0x10]      ; total sectors (low dword of qword)
    emit(0x66, 0xA3, addr("total"))             # mov [total], eax        ; remember it

    # --- the buffer: 32 KiB of PATTERN at 1000:0000 -------------------------
    label("fill")
    emit(0xB8, struct.pack("<H", BUFFER_SEGMENT))  # mov ax, 0x1000       ; buffer segment
    emit(0x8E, 0xC0)                            # mov es, ax              ; ES = buffer segment
    emit(0x31, 0xFF)                            # xor di, di              ; ES:DI = start of the buffer
    emit(0xB9, struct.pack("<H", SECTORS_PER_CALL * SECTOR))  # mov cx, 0x8000 ; byte count
    emit(0xB0, PATTERN)                         # mov al, PATTERN         ; fill byte
    emit(0xF3, 0xAA)                            # rep stosb               ; fill ES:DI, CX times

    # --- for ever: extended write of SECTORS_PER_CALL sectors at [lba] ------
    label("write")
    emit(0xC7, 0x06, addr("count"), struct.pack("<H", SECTORS_PER_CALL))
    #                                             mov word [count], 64    ; the BIOS overwrites it with
    #                                                                     ; the count done: set it each time
    emit(0xBE, addr("dap"))                     # mov si, dap             ; DS:SI = disk address packet
    emit(0x8A, 0x16, addr("drive"))             # mov dl, [drive]         ; DL = boot drive
    emit(0xB8, struct.pack("<H", 0x4300))       # mov ax, 0x4300          ; AH=43h extended write, AL=0 no verify
    emit(0xCD, 0x13)                            # int 0x13                ; write; CF = error
    jump(0x72, "wrap")                          # jc wrap                 ; failed (past the end?): start over
    emit(0x66, 0xA1, addr("lba"))               # mov eax, [lba]          ; the LBA just written
    emit(0x66, 0x83, 0xC0, SECTORS_PER_CALL)    # add eax, 64             ; next LBA
    emit(0x66, 0xA3, addr("lba"))               # mov [lba], eax          ; store it
    emit(0x66, 0x83, 0xC0, SECTORS_PER_CALL)    # add eax, 64             ; end of the next write
    emit(0x66, 0x3B, 0x06, addr("total"))       # cmp eax, [total]        ; does it fit on the disk?
    jump(0x76, "write")                         # jbe write               ; yes: write it
    label("wrap")
    emit(0x66, 0xC7, 0x06, addr("lba"), struct.pack("<I", FIRST_LBA))
    #                                             mov dword [lba], 64     ; back to the first LBA
    jump(0xEB, "write")                         # jmp write               ; and on

    # --- data -----------------------------------------------------------------
    label("drive")
    emit(0x00)                                  # drive: db 0             ; BIOS drive number (0x80)
    emit(0x00)                                  #        db 0             ; pad: align the packet
    label("total")
    emit(struct.pack("<I", 0xFFFFFFFF))         # total: dd 0xFFFFFFFF    ; disk size in sectors
    label("dap")                                # disk address packet (EDD):
    emit(0x10)                                  #   db 16                 ; packet size
    emit(0x00)                                  #   db 0                  ; reserved
    label("count")
    emit(struct.pack("<H", SECTORS_PER_CALL))   #   dw 64                 ; sectors to transfer
    emit(struct.pack("<H", 0))                  #   dw 0                  ; buffer offset
    emit(struct.pack("<H", BUFFER_SEGMENT))     #   dw 0x1000             ; buffer segment
    label("lba")
    emit(struct.pack("<Q", FIRST_LBA))          #   dq 64                 ; starting LBA
    return bytes(code), found


def boot_sector() -> bytes:
    """The 512 bytes of the writer's boot sector (code, zero padding, 55 AA)."""
    code, labels = _assemble({})
    code, again = _assemble(labels)             # second pass: real addresses
    assert again == labels, "label addresses moved between passes"
    assert len(code) <= SECTOR - 2, f"boot sector code too long: {len(code)} bytes"
    return code + bytes(SECTOR - 2 - len(code)) + b"\x55\xaa"


def install(volume_path: str, fmt: str = "qcow2") -> None:
    """Write the boot sector as sector 0 of a volume (not in use by a VM)."""
    fd, path = tempfile.mkstemp(prefix="guest-writer-", suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(boot_sector())
        qemu_img.io(volume_path, f"write -q -s {path} 0 {SECTOR}", fmt=fmt)
    finally:
        os.unlink(path)
    # Read it back: the volume boots this, or the test means nothing.
    with tempfile.TemporaryDirectory(prefix="guest-writer-") as tmp:
        out = os.path.join(tmp, "sector0")
        subprocess.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", f"bs={SECTOR}", "count=1",
                        f"if={volume_path}", f"of={out}"], check=True, capture_output=True)
        with open(out, "rb") as f:
            assert f.read() == boot_sector(), f"sector 0 of {volume_path} is not the writer"


def written_bytes_at(volume_path: str, offset: int, length: int = SECTORS_PER_CALL * SECTOR,
                     fmt: str = "qcow2") -> bool:
    """True if the guest's pattern is at offset. Read-only and without taking
    the image lock (-r -U), so the VM may be running."""
    cmd = ["qemu-io", "-r", "-U", "-f", fmt, "-c", f"read -q -P {PATTERN:#x} {offset} {length}",
           volume_path]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if "Pattern verification failed" in p.stdout + p.stderr:
        return False
    if p.returncode != 0:
        raise qemu_img.QemuImgError(cmd, p.returncode, p.stderr or p.stdout)
    return True
