namespace Vmm;

/// <summary>PROT_* bits of mmap and mprotect.</summary>
[Flags]
public enum Protection
{
    /// <summary>PROT_NONE: no access.</summary>
    None = 0,
    /// <summary>PROT_READ.</summary>
    Read = 1,
    /// <summary>PROT_WRITE (implies read, as on x86).</summary>
    Write = 2,
    /// <summary>PROT_EXEC (accepted and recorded; Vmm runs no code).</summary>
    Exec = 4,
    /// <summary>PROT_SEM: the memory may be used for atomic operations (accepted, no effect, as on x86).</summary>
    Sem = 8,
    /// <summary>PROT_GROWSDOWN (mprotect only): extend the change down to the start of a grows-down mapping. Vmm has none, so mprotect with it is EINVAL; mmap ignores it.</summary>
    GrowsDown = 0x0100_0000,
    /// <summary>PROT_GROWSUP (mprotect only): extend the change up to the end of a grows-up mapping. Vmm has none, so mprotect with it is EINVAL; mmap ignores it.</summary>
    GrowsUp = 0x0200_0000,
    /// <summary>Read and write.</summary>
    ReadWrite = Read | Write,
}

/// <summary>MAP_* flags of mmap. Every mapping is anonymous; exactly one of Private or Shared is required.</summary>
[Flags]
public enum MapFlags
{
    /// <summary>No flag (invalid alone: give Private or Shared).</summary>
    None = 0,
    /// <summary>MAP_SHARED: writes are shared with every process that maps it, across fork.</summary>
    Shared = 0x01,
    /// <summary>MAP_PRIVATE: copy-on-write after fork.</summary>
    Private = 0x02,
    /// <summary>MAP_SHARED_VALIDATE: shared, and unknown flags fail with EOPNOTSUPP instead of being ignored.</summary>
    SharedValidate = Shared | Private,
    /// <summary>MAP_FIXED: map exactly at the address, replacing what is there.</summary>
    Fixed = 0x10,
    /// <summary>MAP_ANONYMOUS (implied: Vmm has no files).</summary>
    Anonymous = 0x20,
    /// <summary>MAP_POPULATE: fault every page in now.</summary>
    Populate = 0x8000,
    /// <summary>MAP_FIXED_NOREPLACE: map exactly at the address, or fail with EEXIST.</summary>
    FixedNoReplace = 0x100000,
}

/// <summary>madvise advice values (Linux's numbers). These are exactly the values madvise accepts; any other is EINVAL.</summary>
public enum Advice
{
    /// <summary>MADV_NORMAL.</summary>
    Normal = 0,
    /// <summary>MADV_WILLNEED: fault the range in now.</summary>
    WillNeed = 3,
    /// <summary>MADV_DONTNEED: drop the pages; private anonymous memory reads zero afterwards.</summary>
    DontNeed = 4,
    /// <summary>MADV_MERGEABLE: let KSM merge identical pages in the range.</summary>
    Mergeable = 12,
    /// <summary>MADV_UNMERGEABLE: unmerge and stop merging.</summary>
    Unmergeable = 13,
    /// <summary>
    /// MADV_HWPOISON (CAP_SYS_ADMIN): inject a memory failure into each page of the range, as if the
    /// hardware had found it corrupted: the frame is poisoned and retired, every mapping of it becomes a
    /// hwpoison entry, and a later access there throws <see cref="BusError"/>.
    /// </summary>
    HwPoison = 100,
    /// <summary>
    /// MADV_SOFT_OFFLINE (CAP_SYS_ADMIN): move each page of the range to a new frame (contents and
    /// mappings kept) and retire the old frame, without disturbing the processes that use it.
    /// </summary>
    SoftOffline = 101,
}

/// <summary>Capabilities a process may hold (Linux's CAP_* subset that memory management checks).</summary>
[Flags]
public enum Capabilities
{
    /// <summary>None.</summary>
    None = 0,
    /// <summary>CAP_SYS_NICE: move other processes' pages (move_pages, MPOL_MF_MOVE_ALL).</summary>
    SysNice = 1 << 0,
    /// <summary>CAP_SYS_ADMIN.</summary>
    SysAdmin = 1 << 1,
    /// <summary>CAP_IPC_LOCK: mlock beyond the limit.</summary>
    IpcLock = 1 << 2,
    /// <summary>CAP_SETUID: change user ids at will (setuid, seteuid, setresuid).</summary>
    SetUid = 1 << 3,
}

/// <summary>Who a process runs as: its real user id and capabilities, and (Linux's cred) its effective and saved user ids.</summary>
/// <remarks>Instances are immutable: safe to share between threads. A process's credentials change only
/// through its own calls (<see cref="VmProcess.SetUid"/>, <see cref="VmProcess.SetEuid"/>,
/// <see cref="VmProcess.SetResUid"/>, <see cref="VmProcess.Capset(Capabilities, Capabilities)"/>), and every permission check uses the current ones.</remarks>
/// <param name="Uid">real user id; 0 is root.</param>
/// <param name="Capabilities">capabilities held (the effective set).</param>
public readonly record struct Credentials(int Uid, Capabilities Capabilities)
{
    /// <summary>The effective user id (euid): the one permission checks against files use; starts as <see cref="Uid"/>.</summary>
    public int EffectiveUid { get; init; } = Uid;

    /// <summary>The saved set-user-id (suid): an id an unprivileged process may switch its effective id back to; starts as <see cref="Uid"/>.</summary>
    public int SavedUid { get; init; } = Uid;

    /// <summary>The permitted capabilities: the most <see cref="Capabilities"/> (the effective set) may hold; starts as <see cref="Capabilities"/>.</summary>
    public Capabilities PermittedCapabilities { get; init; } = Capabilities;

    /// <summary>uid 0 with every capability.</summary>
    public static Credentials Root => new(0, Capabilities.SysNice | Capabilities.SysAdmin | Capabilities.IpcLock | Capabilities.SetUid);

    /// <summary>An unprivileged user.</summary>
    public static Credentials User(int uid) => new(uid, Capabilities.None);

    /// <summary>Whether these credentials hold <paramref name="capability"/> (capable()).</summary>
    public bool Has(Capabilities capability) => (Capabilities & capability) == capability;

    /// <summary>
    /// Whether a process with these credentials may move the pages of a process running as
    /// <paramref name="target"/> (migrate_pages and move_pages: CAP_SYS_NICE, or the caller's real or
    /// effective uid matching the target's real or saved uid).
    /// </summary>
    public bool MayMovePagesOf(Credentials target) =>
        Has(Capabilities.SysNice) ||
        EffectiveUid == target.SavedUid || EffectiveUid == target.Uid || Uid == target.SavedUid || Uid == target.Uid;
}

/// <summary>What kind of access faulted.</summary>
public enum AccessKind
{
    /// <summary>A read.</summary>
    Read,
    /// <summary>A write.</summary>
    Write,
}

/// <summary>Why an access faulted (the si_code of SIGSEGV).</summary>
public enum SegvReason
{
    /// <summary>SEGV_MAPERR: no mapping at the address.</summary>
    MapError = 1,
    /// <summary>SEGV_ACCERR: the mapping does not allow the access.</summary>
    AccessError = 2,
    /// <summary>
    /// The process began to exit while the access was under way (a call that starts after the exit throws
    /// <see cref="InvalidOperationException"/> instead).
    /// </summary>
    Exited = 3,
    /// <summary>
    /// Not raised any more: an access that finds no frame throws <see cref="InsufficientMemoryException"/>.
    /// Kept so that code naming it still compiles.
    /// </summary>
    OutOfMemory = 4,
}

/// <summary>
/// A bad user access (SIGSEGV): no mapping, an address outside user space (at or above TASK_SIZE,
/// 0x7FFF_FFFF_F000, non-canonical addresses included), or a mapping that does not allow it.
/// </summary>
/// <remarks>
/// <see cref="Address"/> is the first byte that could not be accessed. As on Linux, a multi-page access
/// is not atomic: a write (or <c>Fill</c>) that crosses from good pages into a bad one has written its
/// first part, up to <see cref="Address"/>, and a read has filled that part of its destination. An access
/// that starts at or above TASK_SIZE touches nothing; one that runs into TASK_SIZE faults there, as at an
/// unmapped page. Out of frames is not a
/// segmentation fault: the access throws <see cref="InsufficientMemoryException"/>.
/// Thread safety: the properties this exception adds are immutable; the members it inherits from
/// <see cref="Exception"/> are not thread-safe.
/// </remarks>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Naming", "CA1710", Justification = "The name a kernel reader expects (SIGSEGV).")]
public sealed class SegmentationFault : Exception
{
    /// <summary>Creates the exception.</summary>
    public SegmentationFault() { }

    /// <summary>Creates the exception with a message.</summary>
    public SegmentationFault(string message) : base(message) { }

    /// <summary>Creates the exception with a message and cause.</summary>
    public SegmentationFault(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception for a faulting access.</summary>
    public SegmentationFault(ulong address, AccessKind kind, SegvReason reason)
        : base($"segmentation fault: {kind.ToString().ToLowerInvariant()} at 0x{address:x} ({reason})")
    {
        Address = address;
        Kind = kind;
        Reason = reason;
    }

    /// <summary>The faulting address.</summary>
    public ulong Address { get; }

    /// <summary>Read or write.</summary>
    public AccessKind Kind { get; }

    /// <summary>Why.</summary>
    public SegvReason Reason { get; }
}

/// <summary>
/// An access to poisoned memory (SIGBUS with BUS_MCEERR_AR): the page at <see cref="Address"/> was hit by
/// a memory failure (<see cref="Advice.HwPoison"/>, <see cref="Machine.HardOfflinePage"/>) and its contents
/// are gone. Every mapping of the page, in every process (forked children included), throws it on access,
/// and a pin of it fails with it; other pages are not affected, and the process may go on using them.
/// </summary>
/// <remarks>
/// <see cref="Address"/> is the first byte that could not be accessed, as for <see cref="SegmentationFault"/>:
/// a multi-page access has done its part before the poisoned page. Unmapping the page (munmap, or
/// <see cref="Advice.DontNeed"/>) drops the hwpoison entry: the address then faults in a new page as usual.
/// Thread safety: the properties this exception adds are immutable; the members it inherits from
/// <see cref="Exception"/> are not thread-safe.
/// </remarks>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Naming", "CA1710", Justification = "The name a kernel reader expects (SIGBUS).")]
public sealed class BusError : Exception
{
    /// <summary>Creates the exception.</summary>
    public BusError() { }

    /// <summary>Creates the exception with a message.</summary>
    public BusError(string message) : base(message) { }

    /// <summary>Creates the exception with a message and cause.</summary>
    public BusError(string message, Exception inner) : base(message, inner) { }

    /// <summary>Creates the exception for an access to a poisoned page.</summary>
    public BusError(ulong address, AccessKind kind)
        : base($"bus error: {kind.ToString().ToLowerInvariant()} at 0x{address:x} (hardware memory corruption)")
    {
        Address = address;
        Kind = kind;
    }

    /// <summary>The faulting address.</summary>
    public ulong Address { get; }

    /// <summary>Read or write.</summary>
    public AccessKind Kind { get; }
}

/// <summary>What /proc/pid/pagemap (with kpageflags) says about one virtual page.</summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Present">a frame is mapped.</param>
/// <param name="Pfn">the frame, or -1.</param>
/// <param name="Node">the frame's node, or -1.</param>
/// <param name="Writable">the PTE allows writes.</param>
/// <param name="Dirty">the PTE is dirty.</param>
/// <param name="Anonymous">a private anonymous page.</param>
/// <param name="Exclusive">the page is mapped exclusively (PG_anon_exclusive).</param>
/// <param name="ZeroPage">the shared zero page.</param>
/// <param name="Ksm">a KSM page.</param>
/// <param name="Swapped">swapped out (or being migrated).</param>
/// <param name="MapCount">mappings of the frame.</param>
/// <param name="Pinned">FOLL_PIN pins of the frame.</param>
public readonly record struct PagemapEntry(
    bool Present, long Pfn, int Node, bool Writable, bool Dirty, bool Anonymous, bool Exclusive,
    bool ZeroPage, bool Ksm, bool Swapped, int MapCount, int Pinned);

/// <summary>
/// An address space's batched-flush marks at one moment (AddressSpace.ReadFlushMarks): how many
/// translations were removed (migration, hwpoison entries) and write-protected (KSM) with their flush
/// deferred to the end of a batch.
/// </summary>
internal readonly record struct FlushMarks(long Unmap, long Protect);
