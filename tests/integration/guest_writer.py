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
BUFFER_BYTES = SECTORS_PER_CALL * SECTOR


def w16(value: int) -> bytes:
    return struct.pack("<H", value)


def w32(value: int) -> bytes:
    return struct.pack("<I", value)


def w64(value: int) -> bytes:
    return struct.pack("<Q", value)


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
        return w16(labels.get(name, 0))

    def jump(opcode: int, name: str) -> None:   # a 2-byte short (conditional) jump
        emit(opcode, _rel8(here() + 2, labels.get(name, here() + 2)))

    # --- set up: segments, stack, remember the boot drive
    emit(0xFA)                                  # cli                  ; SS:SP change as one
    emit(0x31, 0xC0)                            # xor ax, ax           ; ax = 0
    emit(0x8E, 0xD8)                            # mov ds, ax           ; DS = 0: absolute data
    emit(0x8E, 0xD0)                            # mov ss, ax           ; SS = 0
    emit(0xBC, w16(LOAD_ADDRESS))               # mov sp, 0x7C00       ; stack below the code
    emit(0xFB)                                  # sti                  ; BIOS needs interrupts
    emit(0xFC)                                  # cld                  ; string operations go up
    emit(0x88, 0x16, addr("drive"))             # mov [drive], dl      ; the drive the BIOS booted

    # --- disk size: INT 13h AH=48h (extended get drive parameters)
    emit(0xBE, w16(PARAMS_BUFFER))              # mov si, 0x0600       ; DS:SI = result buffer
    emit(0xC7, 0x04, w16(0x1A))                 # mov word [si], 0x1A  ; its size (EDD 1.x: 26)
    emit(0xB4, 0x48)                            # mov ah, 0x48         ; function 48h (DL: drive)
    emit(0xCD, 0x13)                            # int 0x13             ; fills it; CF = error
    jump(0x72, "fill")                          # jc fill              ; refused: size stays -1
    emit(0x66, 0x8B, 0x44, 0x10)                # mov eax, [si+0x10]   ; sectors (low dword)
    emit(0x66, 0xA3, addr("total"))             # mov [total], eax     ; remember them

    # --- the buffer: 32 KiB of PATTERN at 1000:0000
    label("fill")
    emit(0xB8, w16(BUFFER_SEGMENT))             # mov ax, 0x1000       ; buffer segment
    emit(0x8E, 0xC0)                            # mov es, ax           ; ES = buffer segment
    emit(0x31, 0xFF)                            # xor di, di           ; ES:DI = buffer start
    emit(0xB9, w16(BUFFER_BYTES))               # mov cx, 0x8000       ; byte count
    emit(0xB0, PATTERN)                         # mov al, 0xA5         ; fill byte
    emit(0xF3, 0xAA)                            # rep stosb            ; fill ES:DI, CX times

    # --- for ever: extended write of SECTORS_PER_CALL sectors at [lba]
    label("write")
    # mov word [count], 64 ; the BIOS stores there the count it did: reset it each time
    emit(0xC7, 0x06, addr("count"), w16(SECTORS_PER_CALL))
    emit(0xBE, addr("dap"))                     # mov si, dap          ; DS:SI = address packet
    emit(0x8A, 0x16, addr("drive"))             # mov dl, [drive]      ; DL = boot drive
    emit(0xB8, w16(0x4300))                     # mov ax, 0x4300       ; AH=43h write, AL=0
    emit(0xCD, 0x13)                            # int 0x13             ; write; CF = error
    jump(0x72, "wrap")                          # jc wrap              ; failed (past the end?)
    emit(0x66, 0xA1, addr("lba"))               # mov eax, [lba]       ; the LBA just written
    emit(0x66, 0x83, 0xC0, SECTORS_PER_CALL)    # add eax, 64          ; next LBA
    emit(0x66, 0xA3, addr("lba"))               # mov [lba], eax       ; store it
    emit(0x66, 0x83, 0xC0, SECTORS_PER_CALL)    # add eax, 64          ; end of the next write
    emit(0x66, 0x3B, 0x06, addr("total"))       # cmp eax, [total]     ; on the disk?
    jump(0x76, "write")                         # jbe write            ; yes: write it
    label("wrap")
    # mov dword [lba], 64 ; back to the first LBA
    emit(0x66, 0xC7, 0x06, addr("lba"), w32(FIRST_LBA))
    jump(0xEB, "write")                         # jmp write            ; and on

    # --- data
    label("drive")
    emit(0x00)                                  # drive: db 0          ; BIOS drive number
    emit(0x00)                                  #        db 0          ; pad: align what follows
    label("total")
    emit(w32(0xFFFFFFFF))                       # total: dd -1         ; disk size in sectors
    label("dap")                                # dap:                 ; disk address packet
    emit(0x10)                                  #   db 16              ; packet size
    emit(0x00)                                  #   db 0               ; reserved
    label("count")
    emit(w16(SECTORS_PER_CALL))                 #   dw 64              ; sectors to transfer
    emit(w16(0))                                #   dw 0               ; buffer offset
    emit(w16(BUFFER_SEGMENT))                   #   dw 0x1000          ; buffer segment
    label("lba")
    emit(w64(FIRST_LBA))                        #   dq 64              ; LBA to write
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
