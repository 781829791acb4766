using System.Runtime.InteropServices;
using Vmm.Native.Interop;

namespace Vmm.Native;

/// <summary>
/// Owns the arena's native memory: an anonymous mapping on Linux, an aligned heap block elsewhere.
/// Releasing the handle unmaps or frees it exactly once.
/// </summary>
internal sealed class ArenaHandle : SafeHandle
{
    private ArenaHandle(nint address, nuint length, bool mapped)
        : base(invalidHandleValue: 0, ownsHandle: true)
    {
        SetHandle(address);
        Length = length;
        IsMapped = mapped;
    }

    /// <summary>Bytes owned.</summary>
    public nuint Length { get; }

    /// <summary>True for an mmap'd region (decommit gives memory back to the OS).</summary>
    public bool IsMapped { get; }

    public override bool IsInvalid => handle == 0;

    /// <summary>
    /// Asks the host never to back the range with transparent huge pages (best effort; nothing for the
    /// heap fallback). For a reservation committed in small pieces: with THP "always", the first touch
    /// of a 64 KiB memmap section would otherwise commit a whole 2 MiB huge page.
    /// </summary>
    public void AdviseNoHugePages()
    {
        if (IsMapped)
            _ = Libc.madvise(handle, Length, Libc.MADV_NOHUGEPAGE); // an old kernel without THP says EINVAL: nothing to avoid
    }

    /// <summary>Reserves <paramref name="length"/> bytes without committing them.</summary>
    /// <param name="length">bytes to reserve.</param>
    /// <param name="forcePortable">use the heap fallback even on Linux.</param>
    /// <param name="clearPortable">zero the heap fallback (the arena needs frames that read zero; the
    /// memmap initialises each section before its first use and does not).</param>
    /// <exception cref="ArenaException">the reservation failed.</exception>
    public static unsafe ArenaHandle Reserve(nuint length, bool forcePortable, bool clearPortable = true)
    {
        if (!forcePortable && OperatingSystem.IsLinux())
        {
            // MAP_NORESERVE: no swap is reserved and nothing is committed until a frame is touched,
            // so a large arena costs only what is used.
            nint address = Libc.mmap(0, length, Libc.PROT_READ | Libc.PROT_WRITE,
                Libc.MAP_PRIVATE | Libc.MAP_ANONYMOUS | Libc.MAP_NORESERVE, -1, 0);
            if (address == Libc.MAP_FAILED)
                throw new ArenaException($"mmap of {length} bytes failed (errno {Marshal.GetLastPInvokeError()})");
            return new ArenaHandle(address, length, mapped: true);
        }

        // Portable fallback: committed heap memory, zeroed so every frame starts known-zero.
        void* block;
        try
        {
            block = NativeMemory.AlignedAlloc(length, Topology.PageSize);
        }
        catch (OutOfMemoryException e)
        {
            throw new ArenaException($"allocation of {length} bytes failed", e);
        }
        if (block == null)
            throw new ArenaException($"allocation of {length} bytes failed");
        if (clearPortable)
            NativeMemory.Clear(block, length);
        return new ArenaHandle((nint)block, length, mapped: false);
    }

    protected override unsafe bool ReleaseHandle()
    {
        if (IsMapped)
            return Libc.munmap(handle, Length) == 0;
        NativeMemory.AlignedFree((void*)handle);
        return true;
    }
}

/// <summary>The host could not reserve, commit or release arena memory.</summary>
internal sealed class ArenaException : Exception
{
    /// <summary>Creates the exception.</summary>
    public ArenaException() { }

    /// <summary>Creates the exception with a message.</summary>
    public ArenaException(string message) : base(message) { }

    /// <summary>Creates the exception with a message and cause.</summary>
    public ArenaException(string message, Exception inner) : base(message, inner) { }
}
