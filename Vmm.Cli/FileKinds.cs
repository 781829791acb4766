// FileKinds: what kind of file a path names, asked before anything opens it.
//
// `vmm dedupe` must never open a FIFO (open(2) blocks until a writer comes), a device (/dev/zero reads
// forever) or a socket (open fails with ENXIO). .NET has no public API for a file's type on Unix
// (FileAttributes has no FIFO/device bits there, UnixFileMode holds only the permission bits), so this
// asks the kernel: statx(2), whose struct has one layout on every Linux architecture (struct stat
// does not). And since a path checked can be replaced before it is opened, the open that reads a file
// (OpenRegular) uses O_NONBLOCK (a FIFO then opens at once instead of waiting) and checks the type
// again on the descriptor itself (statx with AT_EMPTY_PATH) before a single byte is read.
//
// Off Linux (no statx in libc) the kinds fall back to what .NET can tell: directory or "file".
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Vmm.Cli;

/// <summary>The file types of st_mode's S_IFMT bits.</summary>
internal enum FileKind
{
    /// <summary>A regular file (S_IFREG).</summary>
    Regular,

    /// <summary>A directory (S_IFDIR).</summary>
    Directory,

    /// <summary>A symbolic link (S_IFLNK), seen only when links are not followed.</summary>
    SymbolicLink,

    /// <summary>A FIFO, a named pipe (S_IFIFO): opening it for reading waits for a writer.</summary>
    Fifo,

    /// <summary>A character device (S_IFCHR) such as /dev/zero: reads may never end.</summary>
    CharacterDevice,

    /// <summary>A block device (S_IFBLK).</summary>
    BlockDevice,

    /// <summary>A Unix domain socket (S_IFSOCK): it cannot be opened.</summary>
    Socket,
}

/// <summary>A path's type and size, or why it could not be examined.</summary>
/// <param name="Kind">the type (meaningful when <paramref name="Error"/> is null).</param>
/// <param name="Length">st_size (for a regular file, its length).</param>
/// <param name="Error">null, or the reason (strerror of the errno: "No such file or directory", ...).</param>
internal readonly record struct FileStatus(FileKind Kind, long Length, string? Error)
{
    /// <summary>"a FIFO", "a character device", ... for messages.</summary>
    public string KindName => Kind switch
    {
        FileKind.Regular => "a regular file",
        FileKind.Directory => "a directory",
        FileKind.SymbolicLink => "a symbolic link",
        FileKind.Fifo => "a FIFO",
        FileKind.CharacterDevice => "a character device",
        FileKind.BlockDevice => "a block device",
        _ => "a socket",
    };
}

/// <summary>statx(2) and a non-blocking open, for <see cref="DedupeCommand"/>.</summary>
internal static partial class FileKinds
{
    private const int AT_FDCWD = -100;
    private const int AT_SYMLINK_NOFOLLOW = 0x100;
    private const int AT_EMPTY_PATH = 0x1000;
    private const uint STATX_TYPE = 0x1, STATX_MODE = 0x2, STATX_SIZE = 0x200;
    private const int O_RDONLY = 0, O_NOCTTY = 0x100, O_NONBLOCK = 0x800, O_CLOEXEC = 0x80000;
    private const int StatxBytes = 256;    // sizeof(struct statx), the same on every architecture
    private const int StatxModeOffset = 28; // __u16 stx_mode
    private const int StatxSizeOffset = 40; // __u64 stx_size

    private static readonly bool HaveStatx = OperatingSystem.IsLinux();

    /// <summary>
    /// The type and size of <paramref name="path"/>; a symbolic link itself when
    /// <paramref name="followLinks"/> is false. Never throws for a bad path: the error is returned.
    /// </summary>
    public static FileStatus Stat(string path, bool followLinks)
    {
        if (!HaveStatx)
            return PortableStat(path);
        Span<byte> buffer = stackalloc byte[StatxBytes];
        int result = statx(AT_FDCWD, path, followLinks ? 0 : AT_SYMLINK_NOFOLLOW, STATX_TYPE | STATX_MODE | STATX_SIZE, ref MemoryMarshal.GetReference(buffer));
        return result == 0 ? Decode(buffer) : new FileStatus(FileKind.Regular, 0, Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError()));
    }

    /// <summary>
    /// Opens a regular file for reading without ever blocking: O_NONBLOCK, then the descriptor's own
    /// type is checked, so a path swapped for a FIFO or a device after <see cref="Stat"/> is refused
    /// instead of hanging. Returns the handle, or null and the reason.
    /// </summary>
    public static SafeFileHandle? OpenRegular(string path, out string? error)
    {
        if (!HaveStatx)
        {
            try
            {
                error = null;
                return File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                error = e.Message;
                return null;
            }
        }
        int fd = open(path, O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
        if (fd < 0)
        {
            error = Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError());
            return null;
        }
        var handle = new SafeFileHandle(fd, ownsHandle: true);
        Span<byte> buffer = stackalloc byte[StatxBytes];
        if (statx(fd, "", AT_EMPTY_PATH, STATX_TYPE | STATX_SIZE, ref MemoryMarshal.GetReference(buffer)) != 0)
        {
            error = Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError());
            handle.Dispose();
            return null;
        }
        FileStatus status = Decode(buffer);
        if (status.Kind != FileKind.Regular)
        {
            error = $"{status.KindName}, not a regular file";
            handle.Dispose();
            return null;
        }
        error = null;
        return handle; // O_NONBLOCK means nothing for a regular file's reads
    }

    private static FileStatus Decode(ReadOnlySpan<byte> statxBuffer)
    {
        ushort mode = MemoryMarshal.Read<ushort>(statxBuffer[StatxModeOffset..]);
        long size = (long)MemoryMarshal.Read<ulong>(statxBuffer[StatxSizeOffset..]);
        FileKind kind = (mode & 0xF000) switch // S_IFMT
        {
            0x8000 => FileKind.Regular,
            0x4000 => FileKind.Directory,
            0xA000 => FileKind.SymbolicLink,
            0x1000 => FileKind.Fifo,
            0x2000 => FileKind.CharacterDevice,
            0x6000 => FileKind.BlockDevice,
            _ => FileKind.Socket, // 0xC000
        };
        return new FileStatus(kind, size, null);
    }

    private static FileStatus PortableStat(string path)
    {
        if (Directory.Exists(path))
            return new FileStatus(FileKind.Directory, 0, null);
        var info = new FileInfo(path);
        if (!info.Exists)
            return new FileStatus(FileKind.Regular, 0, "No such file or directory");
        return new FileStatus(info.LinkTarget is null ? FileKind.Regular : FileKind.SymbolicLink, info.Length, null);
    }

    [LibraryImport("libc", EntryPoint = "statx", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int statx(int dirfd, string path, int flags, uint mask, ref byte statxBuffer);

    [LibraryImport("libc", EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int open(string path, int flags);
}
