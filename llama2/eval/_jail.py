"""The child side of sandbox.py: `python -I _jail.py PROGRAM CPU_S MEMORY FILE_BYTES`.

Runs as a script in a fresh interpreter (standard library only), in the run's temporary
directory. It locks itself in with kernel-enforced limits, then executes PROGRAM:

- rlimits: CPU seconds, address space (a 50 GB allocation is a MemoryError), file size,
  open files, no core dumps, no new processes (RLIMIT_NPROC 0: effective for non-root users);
  then every capability is dropped, so that a root user cannot raise them again;
- seccomp: fork, vfork, clone without CLONE_THREAD, execve and execveat fail with EPERM, for
  every user including root (clone3 gets ENOSYS, so libc falls back to the filtered clone);
- Landlock: files may be created, written, renamed or removed only inside the run's
  directory, and TCP bind/connect are refused (where the kernel's Landlock ABI has them).

Exit status 0 means the program ran to its end; a SystemExit raised by the program counts as
a failure, so that `sys.exit(0)` before the tests is not a pass.
"""

import ctypes
import os
import platform
import resource
import struct
import sys
import traceback

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def set_rlimits(cpu_s: int, memory: int, file_bytes: int) -> None:
    for which, value in (
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_NPROC, 0),
    ):
        resource.setrlimit(which, (value, value))


# --- seccomp: a classic-BPF filter over the syscall number (and clone's flags) -------------
# (syscall numbers per architecture: clone, fork, vfork, execve, execveat, clone3; -1 = none)
_SYSCALLS = {
    "x86_64": (0xC000003E, 56, 57, 58, 59, 322, 435),
    "aarch64": (0xC00000B7, 220, -1, -1, 221, 281, 435),
}
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
EPERM, ENOSYS, CLONE_THREAD = 1, 38, 0x00010000


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_filter(machine: str) -> bytes | None:
    """The filter program for this machine's architecture, or None if it is not known."""
    if machine not in _SYSCALLS:
        return None
    arch, clone, fork, vfork, execve, execveat, clone3 = _SYSCALLS[machine]
    denied = [n for n in (fork, vfork, execve, execveat) if n >= 0]
    prog = [_insn(_LD_W_ABS, 0, 0, 4)]  # seccomp_data.arch
    # another ABI (e.g. 32-bit calls on x86_64) could reach the kernel unfiltered: refuse it
    prog.append(_insn(_JEQ_K, 1, 0, arch))
    prog.append(_insn(_RET_K, 0, 0, _ERRNO | EPERM))
    prog.append(_insn(_LD_W_ABS, 0, 0, 0))  # seccomp_data.nr
    prog.append(_insn(_JGE_K, 0, 1, 0x40000000))  # x32 numbers
    prog.append(_insn(_RET_K, 0, 0, _ERRNO | EPERM))
    for n in denied:
        prog.append(_insn(_JEQ_K, 0, 1, n))
        prog.append(_insn(_RET_K, 0, 0, _ERRNO | EPERM))
    prog.append(_insn(_JEQ_K, 0, 1, clone3))  # flags live in memory: make libc use clone
    prog.append(_insn(_RET_K, 0, 0, _ERRNO | ENOSYS))
    prog.append(_insn(_JEQ_K, 1, 0, clone))
    prog.append(_insn(_RET_K, 0, 0, _ALLOW))
    prog.append(_insn(_LD_W_ABS, 0, 0, 16))  # args[0] (low word): clone's flags
    prog.append(_insn(_JSET_K, 0, 1, CLONE_THREAD))  # a thread: allowed
    prog.append(_insn(_RET_K, 0, 0, _ALLOW))
    prog.append(_insn(_RET_K, 0, 0, _ERRNO | EPERM))
    return b"".join(prog)


def install_seccomp() -> bool:
    program = seccomp_filter(platform.machine())
    if program is None:
        return False
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0):
        raise OSError(ctypes.get_errno(), "seccomp filter refused")
    return True


# --- Landlock: writes only beneath the run's directory -------------------------------------
_LL_CREATE_RULESET, _LL_ADD_RULE, _LL_RESTRICT_SELF = 444, 445, 446  # same on every arch
_LL_RULE_PATH_BENEATH, _LL_RULE_NET_PORT = 1, 2
# access rights: write_file 1<<1, remove_dir 1<<4 ... make_sym 1<<12, refer 1<<13 (ABI 2),
# truncate 1<<14 (ABI 3), ioctl_dev 1<<15 (ABI 5); reading and executing stay unrestricted
_LL_WRITE = {1: 0b1_1111_1111_0010, 2: 0b11_1111_1111_0010, 3: 0b111_1111_1111_0010}
_LL_NET = 0b11  # bind_tcp, connect_tcp (ABI 4)


def install_landlock(directory: str) -> int:
    """Restrict writes to `directory` (and TCP to nothing); the Landlock ABI used, 0 if none."""
    abi = _libc.syscall(_LL_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    write = _LL_WRITE[min(abi, 3)]
    attr = struct.pack("QQ", write, _LL_NET if abi >= 4 else 0)
    size = 16 if abi >= 4 else 8
    ruleset = _libc.syscall(_LL_CREATE_RULESET, attr, size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    fd = os.open(directory, os.O_PATH | os.O_CLOEXEC)
    rule = struct.pack("=Qi", write, fd)
    try:
        if _libc.syscall(_LL_ADD_RULE, ruleset, _LL_RULE_PATH_BENEATH, rule, 0):
            raise OSError(ctypes.get_errno(), "landlock_add_rule")
        if _libc.syscall(_LL_RESTRICT_SELF, ruleset, 0):
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(fd)
        os.close(ruleset)
    return abi


def drop_capabilities() -> None:
    """Empty the capability sets: even root can then not raise the rlimits back, nor bypass
    file permissions."""
    header = ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0), 8)  # version 3
    data = ctypes.create_string_buffer(bytes(24), 24)  # 2 x {effective, permitted, inheritable}
    if _libc.capset(header, data):
        raise OSError(ctypes.get_errno(), "capset")


def main() -> None:
    program, cpu_s, memory, file_bytes = sys.argv[1], *map(int, sys.argv[2:5])
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "no_new_privs")
    install_landlock(os.getcwd())
    set_rlimits(cpu_s, memory, file_bytes)
    drop_capabilities()
    install_seccomp()  # last: nothing above needs to fork
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        print(f"SystemExit: the program exited ({e.code!r}) before it ended", file=sys.stderr)
        os._exit(1)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
