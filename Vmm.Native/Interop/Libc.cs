using System.Runtime.InteropServices;

namespace Vmm.Native.Interop;

/// <summary>The libc memory-mapping calls the arena uses (Linux only).</summary>
internal static partial class Libc
{
    private const string LibraryName = "libc";

    internal const int PROT_NONE = 0x0;
    internal const int PROT_READ = 0x1;
    internal const int PROT_WRITE = 0x2;

    internal const int MAP_PRIVATE = 0x02;
    internal const int MAP_ANONYMOUS = 0x20;
    internal const int MAP_NORESERVE = 0x4000;

    /// <summary>Drop the pages: the next touch of a private anonymous mapping reads zeros.</summary>
    internal const int MADV_DONTNEED = 4;

    /// <summary>Never back the range with transparent huge pages: a first touch commits 4 KiB, not 2 MiB.</summary>
    internal const int MADV_NOHUGEPAGE = 15;

    /// <summary>Prefault writable pages (Linux 5.14+); EINVAL on older kernels.</summary>
    internal const int MADV_POPULATE_WRITE = 23;

    internal static readonly nint MAP_FAILED = -1;

    [LibraryImport(LibraryName, SetLastError = true)]
    internal static partial nint mmap(nint addr, nuint length, int prot, int flags, int fd, nint offset);

    [LibraryImport(LibraryName, SetLastError = true)]
    internal static partial int munmap(nint addr, nuint length);

    [LibraryImport(LibraryName, SetLastError = true)]
    internal static partial int madvise(nint addr, nuint length, int advice);
}
