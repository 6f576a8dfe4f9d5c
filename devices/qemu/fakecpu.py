"""A generated arm64 CPU description (`/proc/cpuinfo` + `/sys/devices/system/cpu`) for qemu-user guests.

qemu-user shows the x86 host's `/proc/cpuinfo` and `/sys` to the guest; XNNPACK (pytorch/cpuinfo) then fails
to initialise or `import torch` crashes. The harness bind-mounts these files over the guest's view instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheLevel:
    level: int
    kind: str  # Data, Instruction, Unified
    size_kb: int
    ways: int
    line_bytes: int = 64
    shared: bool = False  # shared by all cores (else private to each core)


@dataclass(frozen=True)
class ArmCpu:
    """One arm64 SoC: the qemu CPU model and what the kernel would report for it."""

    qemu_cpu: str
    implementer: int
    variant: int
    part: int
    revision: int
    cores: int
    max_freq_khz: int
    features: str
    caches: tuple[CacheLevel, ...]


_A72_A76_FEATURES = "fp asimd evtstrm crc32 cpuid"
CPUS: dict[str, ArmCpu] = {
    # Raspberry Pi 4 (BCM2711): 4x Cortex-A72 r0p3 at 1.5 GHz; L1d 32 KiB, L1i 48 KiB, 1 MiB shared L2.
    "rpi4": ArmCpu(
        "cortex-a72",
        0x41,
        0x0,
        0xD08,
        3,
        4,
        1_500_000,
        _A72_A76_FEATURES,
        (
            CacheLevel(1, "Data", 32, 2),
            CacheLevel(1, "Instruction", 48, 3),
            CacheLevel(2, "Unified", 1024, 16, 64, True),
        ),
    ),
    # Raspberry Pi 5 (BCM2712): 4x Cortex-A76 r4p1 at 2.4 GHz; L1 64+64 KiB, L2 512 KiB per core, L3 2 MiB shared.
    "rpi5": ArmCpu(
        "cortex-a76",
        0x41,
        0x4,
        0xD0B,
        1,
        4,
        2_400_000,
        _A72_A76_FEATURES + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp",
        (
            CacheLevel(1, "Data", 64, 4),
            CacheLevel(1, "Instruction", 64, 4),
            CacheLevel(2, "Unified", 512, 8),
            CacheLevel(3, "Unified", 2048, 16, 64, True),
        ),
    ),
}


def midr_el1(cpu: ArmCpu) -> int:
    """MIDR_EL1 = implementer<<24 | variant<<20 | architecture(0xF)<<16 | part<<4 | revision."""
    return cpu.implementer << 24 | cpu.variant << 20 | 0xF << 16 | cpu.part << 4 | cpu.revision


def cpu_range(cores: int) -> str:
    """The kernel's list syntax for cpus 0..cores-1: `0` or `0-3`."""
    return "0" if cores == 1 else f"0-{cores - 1}"


def cpuinfo_text(cpu: ArmCpu) -> str:
    """`/proc/cpuinfo` as an arm64 Linux kernel writes it."""
    blocks = [
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {cpu.features}\n"
        f"CPU implementer\t: 0x{cpu.implementer:02x}\nCPU architecture: 8\nCPU variant\t: 0x{cpu.variant:x}\n"
        f"CPU part\t: 0x{cpu.part:03x}\nCPU revision\t: {cpu.revision}\n"
        for n in range(cpu.cores)
    ]
    return "\n".join(blocks) + "\n"


def cache_files(cache: CacheLevel, core: int, cores: int) -> dict[str, str]:
    """The files of one `cpuN/cache/indexK/`; number_of_sets = size / (ways · line)."""
    shared = cpu_range(cores) if cache.shared else str(core)
    mask = (1 << cores) - 1 if cache.shared else 1 << core
    return {
        "level": str(cache.level),
        "type": cache.kind,
        "size": f"{cache.size_kb}K",
        "ways_of_associativity": str(cache.ways),
        "coherency_line_size": str(cache.line_bytes),
        "number_of_sets": str(cache.size_kb * 1024 // (cache.ways * cache.line_bytes)),
        "shared_cpu_list": shared,
        "shared_cpu_map": f"{mask:x}",
    }


def sys_files(cpu: ArmCpu) -> dict[str, str]:
    """Relative path under `sys/devices/system/cpu/` -> content (one line each, as sysfs shows them)."""
    every = cpu_range(cpu.cores)
    files = {name: every for name in ("possible", "present", "online")}
    files["offline"] = ""
    files["kernel_max"] = str(cpu.cores - 1)
    for n in range(cpu.cores):
        d = f"cpu{n}"
        files[f"{d}/online"] = "1"
        files[f"{d}/regs/identification/midr_el1"] = f"0x{midr_el1(cpu):016x}"
        files[f"{d}/regs/identification/revidr_el1"] = "0x0000000000000000"
        files[f"{d}/cpufreq/cpuinfo_max_freq"] = str(cpu.max_freq_khz)
        files[f"{d}/cpufreq/cpuinfo_min_freq"] = str(cpu.max_freq_khz // 2)
        topology = {"physical_package_id": "0", "cluster_id": "0", "core_id": str(n)}
        topology |= {k: every for k in ("core_siblings_list", "package_cpus_list", "cluster_cpus_list")}
        topology |= {"thread_siblings_list": str(n), "core_cpus_list": str(n)}
        files |= {f"{d}/topology/{k}": v for k, v in topology.items()}
        for k, cache in enumerate(cpu.caches):
            files |= {f"{d}/cache/index{k}/{f}": v for f, v in cache_files(cache, n, cpu.cores).items()}
    return files


def write_fake_cpu(out: Path, board: str) -> ArmCpu:
    """Write `out/cpuinfo` and `out/sys/devices/system/cpu/...` for `board`; returns its CPU."""
    if board not in CPUS:
        raise ValueError(f"no arm64 CPU description for board {board!r}; known: {', '.join(sorted(CPUS))}")
    cpu = CPUS[board]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpuinfo").write_text(cpuinfo_text(cpu))
    base = out / "sys" / "devices" / "system" / "cpu"
    for rel, text in sys_files(cpu).items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return cpu
