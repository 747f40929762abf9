"""What a shared library holds, read from the file itself: its needed libraries (DT_NEEDED), its
run path, its dynamic symbols, the first bytes of a function, and the GPU kernels of its
`.nv_fatbin` section (SASS architectures and PTX). No tool is run (users have no cuobjdump)
and nothing is loaded, so a library whose driver is missing can still be read.

Only 64-bit little-endian ELF (x86_64, aarch64) is read; anything else is an ElfError."""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 1, 5, 14, 15, 29
SHT_DYNSYM = 11
PT_LOAD = 1
FATBIN_MAGIC_BYTES = struct.pack("<I", 0xBA55ED50)
FATBIN_PTX, FATBIN_ELF = 0x1, 0x2


class ElfError(ValueError):
    """The file is not a 64-bit little-endian ELF shared object, or is truncated."""


@dataclass
class Kernels:
    """The GPU code a fatbin carries: SASS (machine code, runs on its architecture and on later
    minor versions of the same major) and PTX (compiled by the driver for any later GPU)."""

    sass: list = field(default_factory=list)  # ["sm_50", ...] sorted by number
    ptx: list = field(default_factory=list)  # ["compute_86", ...]
    containers: int = 0  # fatbin containers found (one per CUDA translation unit, roughly)

    def to_json(self) -> dict:
        return {"sass": self.sass, "ptx": self.ptx}


class SharedLibrary:
    """An ELF file opened for reading (memory-mapped: reading the headers of a 900 MB library
    touches a few pages). Use as a context manager, or call close()."""

    def __init__(self, path: str):
        self.path = path
        self._fh = open(path, "rb")
        try:
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            self._fh.close()
            raise ElfError(f"{path}: empty file, not an ELF library") from None
        try:
            self._read_headers()
        except (struct.error, IndexError):
            self.close()
            raise ElfError(f"{path}: truncated or corrupt ELF file") from None
        except ElfError:
            self.close()
            raise

    def close(self) -> None:
        self._map.close()
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- headers ---------------------------------------------------------------------------------
    def _read_headers(self) -> None:
        m = self._map
        if m[:4] != b"\x7fELF":
            raise ElfError(f"{self.path}: not an ELF file")
        if m[4] != 2 or m[5] != 1:
            raise ElfError(f"{self.path}: only 64-bit little-endian ELF is read (class {m[4]}, data {m[5]})")
        (phoff, shoff) = struct.unpack_from("<QQ", m, 0x20)
        (phentsize, phnum, shentsize, shnum, shstrndx) = struct.unpack_from("<HHHHH", m, 0x36)
        self.segments = []  # (vaddr, offset, filesz) of PT_LOAD segments
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                "<IIQQQQ", m, phoff + i * phentsize)
            if p_type == PT_LOAD:
                self.segments.append((p_vaddr, p_offset, p_filesz))
        self.sections = {}  # name -> (type, offset, size, link, entsize)
        raw = []
        for i in range(shnum):
            name, s_type, _flags, _addr, offset, size, link, _info, _align, entsize = struct.unpack_from(
                "<IIQQQQIIQQ", m, shoff + i * shentsize)
            raw.append((name, s_type, offset, size, link, entsize))
        if raw and shstrndx < len(raw):
            strtab_off = raw[shstrndx][2]
            for name, s_type, offset, size, link, entsize in raw:
                self.sections[self._cstr(strtab_off + name)] = (s_type, offset, size, link, entsize)
        self._raw_sections = raw
        self._dynamic = self._read_dynamic()

    def _cstr(self, offset: int) -> str:
        end = self._map.find(b"\0", offset)
        return self._map[offset:end].decode("utf-8", "replace")

    def _read_dynamic(self) -> list:
        if ".dynamic" not in self.sections or ".dynstr" not in self.sections:
            return []
        _, offset, size, _, _ = self.sections[".dynamic"]
        strtab = self.sections[".dynstr"][1]
        entries = []
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", self._map, pos)
            if tag == 0:
                break
            if tag in (DT_NEEDED, DT_SONAME, DT_RPATH, DT_RUNPATH):
                entries.append((tag, self._cstr(strtab + value)))
        return entries

    # --- what the dynamic linker reads ------------------------------------------------------------
    @property
    def needed(self) -> list:
        return [v for t, v in self._dynamic if t == DT_NEEDED]

    @property
    def soname(self):
        return next((v for t, v in self._dynamic if t == DT_SONAME), None)

    @property
    def search_path(self) -> list:
        """DT_RUNPATH (or the older DT_RPATH) entries, $ORIGIN not expanded."""
        for tag in (DT_RUNPATH, DT_RPATH):
            for t, v in self._dynamic:
                if t == tag:
                    return [p for p in v.split(":") if p]
        return []

    def dynamic_symbols(self, defined: bool):
        """Names of the dynamic symbols this library defines (defined=True) or imports."""
        for _name, s_type, offset, size, link, entsize in self._raw_sections:
            if s_type != SHT_DYNSYM or not entsize:
                continue
            strtab = self._raw_sections[link][2]
            for pos in range(offset + entsize, offset + size, entsize):  # entry 0 is the null symbol
                st_name, _info, _other, shndx, _value, _size = struct.unpack_from("<IBBHQQ", self._map, pos)
                if st_name and (shndx != 0) == defined:
                    yield self._cstr(strtab + st_name)

    def function_bytes(self, symbol: str, count: int = 16):
        """The first `count` bytes of the code of an exported function, or None."""
        for _name, s_type, offset, size, link, entsize in self._raw_sections:
            if s_type != SHT_DYNSYM or not entsize:
                continue
            strtab = self._raw_sections[link][2]
            for pos in range(offset + entsize, offset + size, entsize):
                st_name, _info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", self._map, pos)
                if shndx and st_name and self._cstr(strtab + st_name) == symbol:
                    file_offset = self._file_offset(value)
                    return None if file_offset is None else bytes(self._map[file_offset:file_offset + count])
        return None

    def _file_offset(self, vaddr: int):
        for seg_vaddr, seg_offset, filesz in self.segments:
            if seg_vaddr <= vaddr < seg_vaddr + filesz:
                return seg_offset + vaddr - seg_vaddr
        return None

    # --- GPU code ----------------------------------------------------------------------------------
    def kernels(self) -> Kernels:
        """The SASS architectures and PTX versions of every fatbin container in `.nv_fatbin`.

        A container: a 16-byte header (magic 0xBA55ED50, version, header size, size of what
        follows), then entries back to back, each a header (kind at +0: 1 PTX, 2 ELF; its own
        size at +4; the payload size at +8; the architecture at +28) and its payload. Containers
        follow each other, sometimes padded apart."""
        found = Kernels()
        if ".nv_fatbin" not in self.sections:
            return found
        _, start, size, _, _ = self.sections[".nv_fatbin"]
        end = min(start + size, len(self._map))
        sass, ptx = set(), set()
        pos = start
        while True:
            pos = self._map.find(FATBIN_MAGIC_BYTES, pos, end - 16)  # containers may be padded apart
            if pos < 0:
                break
            _magic, _version, header_size, body = struct.unpack_from("<IHHQ", self._map, pos)
            found.containers += 1
            entry, stop = pos + header_size, min(pos + header_size + body, end)
            while entry + 32 <= stop:
                kind, _v, entry_size, payload = struct.unpack_from("<HHIQ", self._map, entry)
                arch = struct.unpack_from("<I", self._map, entry + 28)[0]
                if entry_size == 0:
                    break
                if kind & FATBIN_PTX:
                    ptx.add(arch)
                elif kind & (FATBIN_ELF | 0x10):
                    sass.add(arch)
                entry += entry_size + payload
            pos = max(stop, pos + 16)
        found.sass = [f"sm_{a}" for a in sorted(sass)]
        found.ptx = [f"compute_{a}" for a in sorted(ptx)]
        return found


def needed(path: str) -> list:
    with SharedLibrary(path) as lib:
        return lib.needed


def kernels(path: str) -> Kernels:
    with SharedLibrary(path) as lib:
        return lib.kernels()
