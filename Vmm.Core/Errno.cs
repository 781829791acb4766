namespace Vmm;

/// <summary>
/// Linux error numbers, returned (never thrown) by the syscall-shaped operations: VmProcess's Mmap,
/// Munmap, Mprotect, Madvise, SetMemoryMerge / GetMemoryMerge, SetDedupeDomain, ReadKsmStat, MovePages,
/// MigratePages and the credential calls; Ksm's Write, TryRead and SetRun; Machine.ReadVmStat, SoftOfflinePage and HardOfflinePage. <see cref="None"/> is success.
/// </summary>
public enum Errno
{
    /// <summary>Success.</summary>
    None = 0,
    /// <summary>Operation not permitted.</summary>
    EPERM = 1,
    /// <summary>No such file, page or entry.</summary>
    ENOENT = 2,
    /// <summary>No such process.</summary>
    ESRCH = 3,
    /// <summary>Interrupted (cancelled).</summary>
    EINTR = 4,
    /// <summary>I/O error, or a page that cannot be made to comply (a soft offline of a page that is neither free nor on an LRU list).</summary>
    EIO = 5,
    /// <summary>No such device or address (a frame number outside the machine).</summary>
    ENXIO = 6,
    /// <summary>Try again.</summary>
    EAGAIN = 11,
    /// <summary>Out of memory, or part of a range not mapped.</summary>
    ENOMEM = 12,
    /// <summary>Permission denied.</summary>
    EACCES = 13,
    /// <summary>Bad address.</summary>
    EFAULT = 14,
    /// <summary>Busy.</summary>
    EBUSY = 16,
    /// <summary>Already exists (MAP_FIXED_NOREPLACE over a mapping).</summary>
    EEXIST = 17,
    /// <summary>No such device (a node that is not online).</summary>
    ENODEV = 19,
    /// <summary>Invalid argument.</summary>
    EINVAL = 22,
    /// <summary>No space left (swap full).</summary>
    ENOSPC = 28,
    /// <summary>Result out of range (a knob value too large for its type).</summary>
    ERANGE = 34,
    /// <summary>Operation not supported (an unknown flag with MAP_SHARED_VALIDATE).</summary>
    EOPNOTSUPP = 95,
    /// <summary>Memory page has hardware error (a frame poisoned already).</summary>
    EHWPOISON = 133,
}
