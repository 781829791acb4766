// PageOps: the 4 KiB page kernels of the virtual memory manager.
//
// Every operation here works on exactly one page of PageOps.PageSize (Topology.PageSize, 4096) bytes, given by pointer:
//
//   * Checksum64 and PageEquals are the KSM (same-page merging) kernels. The scanner checksums a
//     candidate page on each visit and only considers it for merging once the checksum stops changing;
//     the same checksum (mixed with a per-domain secret) keys KSM's hash indexes, and PageEquals
//     confirms a match right before two frames are merged. DedupeStore.EstimateSavings uses Checksum64
//     too. Checksum (32 bits, the same pass) and Compare (memcmp order, what Linux's ordered trees use)
//     are kept as kernels with tests and benchmarks; no mechanism calls them today.
//   * Copy backs copy-on-write breaks and page migration. The destination is used right after the copy,
//     so it deliberately uses ordinary (cache-allocating) stores, not non-temporal ones.
//   * Zero and IsZero fill fresh frames and detect zero pages (which are mapped to the shared zero frame).
//
// The vector kernels come in four widths (Vector512, Vector256, Vector128 and a scalar ulong loop). The
// public methods pick the widest hardware-accelerated width with an `if (VectorN.IsHardwareAccelerated)`
// chain: those properties are JIT-time constants, so the dispatch is folded away and the public method
// compiles to exactly one kernel. Tests reach the other widths through the internal overloads that take
// an explicit PageOpsWidth.
//
// Why Checksum runs several CRC streams: the CRC32C instruction has a latency of 3 cycles but a throughput
// of one per cycle, so a single dependent chain over the page runs at a third of the possible speed. Four
// independent chains keep the CRC unit busy every cycle; the four stream values are then folded into one
// with two more CRC steps. The streams take the page's 8-byte words round-robin (stream k gets words k,
// k+4, k+8, ...) rather than one contiguous quarter each, so the page is read in a single sequential pass:
// measured out of cache on Zen 3, four quarter-streams ran ~3x slower (~620 vs ~200 ns per page), with or
// without software prefetch, while the sequential pass is as fast as in cache. The result is therefore not
// the plain CRC32C of the page; see Checksum(byte*) for the exact definition, which every code path
// (SSE4.2, ARM64, portable) implements bit for bit.
//
// Locking: none. Pure functions of the bytes they are given; the caller keeps the page stable (a
// reference, a page lock or a pin) for as long as the answer must hold.
using System.Diagnostics;
using System.Diagnostics.CodeAnalysis;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.Arm;
using System.Runtime.Intrinsics.X86;

namespace Vmm.Native;

/// <summary>The vector width a page kernel runs with (see the internal overloads of <see cref="PageOps"/>).</summary>
internal enum PageOpsWidth
{
    /// <summary>A plain <see langword="ulong"/> loop, 8 bytes per step.</summary>
    Scalar,

    /// <summary><see cref="Vector128{T}"/>, 16 bytes per step.</summary>
    V128,

    /// <summary><see cref="Vector256{T}"/>, 32 bytes per step.</summary>
    V256,

    /// <summary><see cref="Vector512{T}"/>, 64 bytes per step.</summary>
    V512,
}

/// <summary>The CRC32C implementation <see cref="PageOps.Checksum(byte*)"/> runs with.</summary>
internal enum PageOpsCrc
{
    /// <summary><see cref="BitOperations.Crc32C(uint, ulong)"/> (software where the CPU lacks CRC32C).</summary>
    Portable,

    /// <summary><see cref="Sse42.X64.Crc32(ulong, ulong)"/>.</summary>
    Sse42X64,

    /// <summary><see cref="Crc32.Arm64.ComputeCrc32C(uint, ulong)"/>.</summary>
    Arm64,
}

/// <summary>
/// Kernels over one 4 KiB page: equality, memcmp-order comparison, zero test, checksum, copy and zeroing.
/// </summary>
/// <remarks>
/// Pointers must be non-null and address <see cref="PageSize"/> readable (and, for the destination,
/// writable) bytes. They need not be aligned; page-aligned pointers are merely the common case.
/// </remarks>
internal static unsafe class PageOps
{
    /// <summary>
    /// Copies <paramref name="length"/> bytes (a multiple of 64) to a 32-byte aligned destination with
    /// non-temporal stores, then fences. For large writes into memory that will not be read soon: the
    /// stores skip the read-for-ownership of every destination line, as memcpy does above its
    /// non-temporal threshold. Falls back to an ordinary copy where AVX is missing.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void CopyNonTemporal(byte* dst, byte* src, nuint length)
    {
        Debug.Assert(((nuint)dst & 31) == 0 && (length & 63) == 0);
        if (!Avx.IsSupported)
        {
            Buffer.MemoryCopy(src, dst, length, length);
            return;
        }
        for (nuint i = 0; i < length; i += 64)
        {
            Vector256<byte> v0 = Vector256.Load(src + i);
            Vector256<byte> v1 = Vector256.Load(src + i + 32);
            Avx.StoreAlignedNonTemporal(dst + i, v0);
            Avx.StoreAlignedNonTemporal(dst + i + 32, v1);
        }
        // Why the fence: non-temporal stores are weakly ordered; they must be visible before the
        // caller's access section ends and anyone else can look at the frame.
        Sse.StoreFence();
    }

    /// <summary>The size of a page in bytes: 4096 (<see cref="Topology.PageSize"/>).</summary>
    public const int PageSize = Topology.PageSize;

    /// <summary>The number of CRC32C streams <see cref="Checksum(byte*)"/> interleaves.</summary>
    internal const int ChecksumStreams = 4;

    /// <summary>The seed of every checksum stream and of the fold.</summary>
    internal const uint ChecksumSeed = 0xFFFF_FFFFu;

    /// <summary>The width the public kernels run with on this machine.</summary>
    internal static readonly PageOpsWidth BestWidth =
        Vector512.IsHardwareAccelerated ? PageOpsWidth.V512 :
        Vector256.IsHardwareAccelerated ? PageOpsWidth.V256 :
        Vector128.IsHardwareAccelerated ? PageOpsWidth.V128 :
        PageOpsWidth.Scalar;

    /// <summary>The CRC32C implementation the public <see cref="Checksum(byte*)"/> runs with on this machine.</summary>
    internal static readonly PageOpsCrc BestCrc =
        Sse42.X64.IsSupported ? PageOpsCrc.Sse42X64 :
        Crc32.Arm64.IsSupported ? PageOpsCrc.Arm64 :
        PageOpsCrc.Portable;

    /// <summary>A short description of the code paths in use, for reports (e.g. "Vector256 + CRC32C(SSE4.2) x4").</summary>
    internal static string Implementation
    {
        get
        {
            string width = BestWidth switch
            {
                PageOpsWidth.V512 => "Vector512",
                PageOpsWidth.V256 => "Vector256",
                PageOpsWidth.V128 => "Vector128",
                _ => "scalar",
            };
            string crc = BestCrc switch
            {
                PageOpsCrc.Sse42X64 => "SSE4.2",
                PageOpsCrc.Arm64 => "ARM64",
                _ => "portable",
            };
            return $"{width} + CRC32C({crc}) x{ChecksumStreams}";
        }
    }

    /// <summary>Whether <paramref name="width"/> runs on vector hardware here (other widths still work, emulated).</summary>
    internal static bool IsHardwareAccelerated(PageOpsWidth width) => width switch
    {
        PageOpsWidth.V512 => Vector512.IsHardwareAccelerated,
        PageOpsWidth.V256 => Vector256.IsHardwareAccelerated,
        PageOpsWidth.V128 => Vector128.IsHardwareAccelerated,
        _ => true,
    };

    /// <summary>Whether <paramref name="crc"/> can run here (the others throw <see cref="PlatformNotSupportedException"/>).</summary>
    internal static bool IsSupported(PageOpsCrc crc) => crc switch
    {
        PageOpsCrc.Sse42X64 => Sse42.X64.IsSupported,
        PageOpsCrc.Arm64 => Crc32.Arm64.IsSupported,
        _ => true,
    };

    // ------------------------------------------------------------------------------------------------
    // Public pointer API: each method folds to a single kernel at JIT time.
    // ------------------------------------------------------------------------------------------------

    /// <summary>Returns whether the pages at <paramref name="a"/> and <paramref name="b"/> hold the same 4096 bytes.</summary>
    /// <param name="a">The first page.</param>
    /// <param name="b">The second page.</param>
    /// <returns><see langword="true"/> iff all 4096 bytes are equal; returns early at the first differing block.</returns>
    // Why AggressiveOptimization: the kernels sit on every fault, copy and scan; tiered compilation
    // could leave them in unoptimized tier-0 code (no vector inlining) for a long time.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static bool PageEquals(byte* a, byte* b)
    {
        Debug.Assert(a != null && b != null);
        if (Vector512.IsHardwareAccelerated) return PageEquals512(a, b);
        if (Vector256.IsHardwareAccelerated) return PageEquals256(a, b);
        if (Vector128.IsHardwareAccelerated) return PageEquals128(a, b);
        return PageEqualsScalar(a, b);
    }

    /// <summary>Compares two pages in memcmp order.</summary>
    /// <param name="a">The first page.</param>
    /// <param name="b">The second page.</param>
    /// <returns>
    /// -1 if at the first differing byte <paramref name="a"/>'s byte is smaller (compared as unsigned), 1 if it
    /// is larger, 0 if the pages are equal. Always exactly -1, 0 or 1.
    /// </returns>
    // Why AggressiveOptimization: the kernels sit on every fault, copy and scan; tiered compilation
    // could leave them in unoptimized tier-0 code (no vector inlining) for a long time.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static int Compare(byte* a, byte* b)
    {
        Debug.Assert(a != null && b != null);
        if (Vector512.IsHardwareAccelerated) return Compare512(a, b);
        if (Vector256.IsHardwareAccelerated) return Compare256(a, b);
        if (Vector128.IsHardwareAccelerated) return Compare128(a, b);
        return CompareScalar(a, b);
    }

    /// <summary>Returns whether all 4096 bytes of the page at <paramref name="p"/> are zero.</summary>
    /// <param name="p">The page.</param>
    /// <returns><see langword="true"/> iff every byte is zero; tests 256 bytes at a time (128 with Vector128, 64 scalar) and returns at the first non-zero block.</returns>
    // Why AggressiveOptimization: the kernels sit on every fault, copy and scan; tiered compilation
    // could leave them in unoptimized tier-0 code (no vector inlining) for a long time.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static bool IsZero(byte* p)
    {
        Debug.Assert(p != null);
        if (Vector512.IsHardwareAccelerated) return IsZero512(p);
        if (Vector256.IsHardwareAccelerated) return IsZero256(p);
        if (Vector128.IsHardwareAccelerated) return IsZero128(p);
        return IsZeroScalar(p);
    }

    /// <summary>
    /// Computes the page's 32-bit content checksum, used by the KSM scanner to detect pages whose content
    /// changes between visits. It is not the plain CRC32C of the page; it is defined as follows.
    /// </summary>
    /// <remarks>
    /// <para>
    /// Let <c>update(c, bytes)</c> be the raw CRC32C (Castagnoli, reflected polynomial 0x82F63B78) register
    /// update of <c>c</c> over <c>bytes</c> in address order, with no inversion on input or output; this is
    /// what the SSE4.2 <c>crc32</c> instruction, ARMv8 <c>crc32cx</c> and
    /// <see cref="BitOperations.Crc32C(uint, ulong)"/> compute, a 64-bit operand being its 8 bytes in
    /// little-endian order.
    /// </para>
    /// <para>
    /// Streams: the page is 512 little-endian 8-byte words <c>w[0..511]</c> (<c>w[j]</c> = bytes
    /// <c>8j .. 8j+7</c>), dealt round-robin to four streams: stream <c>k</c> (0..3) takes
    /// <c>w[k], w[k+4], w[k+8], ..., w[k+508]</c>, and
    /// <c>s[k] = update(0xFFFFFFFF, bytes of those 128 words in that order)</c>. (So <c>s[k]</c> is the
    /// bitwise complement of the standard CRC32C of the 1024 bytes stream <c>k</c> takes.)
    /// </para>
    /// <para>
    /// Fold: <c>f = update(0xFFFFFFFF, le64(s[0] | (ulong)s[1] &lt;&lt; 32))</c>, then
    /// <c>f = update(f, le64(s[2] | (ulong)s[3] &lt;&lt; 32))</c>, where <c>le64</c> is the 8 little-endian
    /// bytes of a 64-bit value; the checksum is <c>~f</c>.
    /// </para>
    /// <para>
    /// Any single-bit change, indeed any change confined to 32 consecutive bits of one word, changes the
    /// checksum: it changes exactly one stream value (CRC32C detects every burst of up to 32 bits), and with
    /// the other stream values fixed the fold is injective in each of them (each fills 32 consecutive bits
    /// of a fold word, and a CRC update with fixed data is a bijection of the register). Every
    /// implementation (SSE4.2, ARM64, portable) returns the same value for the same bytes.
    /// </para>
    /// </remarks>
    /// <param name="p">The page.</param>
    /// <returns>The checksum defined above.</returns>
    // Why AggressiveOptimization: the kernels sit on every fault, copy and scan; tiered compilation
    // could leave them in unoptimized tier-0 code (no vector inlining) for a long time.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static uint Checksum(byte* p)
    {
        Debug.Assert(p != null);
        if (Sse42.X64.IsSupported) return ChecksumSse42(p);
        if (Crc32.Arm64.IsSupported) return ChecksumArm64(p);
        return ChecksumPortable(p);
    }

    /// <summary>
    /// A 64-bit content checksum from the same single pass as <see cref="Checksum(byte*)"/>: the four
    /// stream values are folded in pairs, <c>hi = update(0xFFFFFFFF, le64(s[0] | s[1] &lt;&lt; 32))</c> and
    /// <c>lo = update(0xFFFFFFFF, le64(s[2] | s[3] &lt;&lt; 32))</c>, and the result is
    /// <c>~((ulong)hi &lt;&lt; 32 | lo)</c>. The KSM scanner uses it both as the change filter and as the
    /// key of its content index; two different pages share it by accident with probability about 2^-64.
    /// It is not a cryptographic hash: equality of content is always confirmed by a full compare.
    /// </summary>
    /// <param name="p">The page.</param>
    /// <returns>The checksum defined above.</returns>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static ulong Checksum64(byte* p)
    {
        Debug.Assert(p != null);
        if (Sse42.X64.IsSupported) return Checksum64Sse42(p);
        if (Crc32.Arm64.IsSupported) return Checksum64Arm64(p);
        return Checksum64Portable(p);
    }

    /// <summary><see cref="Checksum64(byte*)"/> with an explicit CRC32C implementation.</summary>
    internal static ulong Checksum64(byte* p, PageOpsCrc crc) => crc switch
    {
        PageOpsCrc.Sse42X64 => Checksum64Sse42(p),
        PageOpsCrc.Arm64 => Checksum64Arm64(p),
        _ => Checksum64Portable(p),
    };

    /// <summary>Copies the 4096 bytes at <paramref name="src"/> to <paramref name="dst"/>.</summary>
    /// <remarks>Uses ordinary stores, so the destination is in cache afterwards.</remarks>
    /// <param name="dst">The destination page; must not overlap <paramref name="src"/>.</param>
    /// <param name="src">The source page.</param>
    // Why AggressiveOptimization: the kernels sit on every fault, copy and scan; tiered compilation
    // could leave them in unoptimized tier-0 code (no vector inlining) for a long time.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Copy(byte* dst, byte* src)
    {
        Debug.Assert(dst != null && src != null);
        Debug.Assert(dst + PageSize <= src || src + PageSize <= dst, "Copy: the pages must not overlap.");
        if (Vector512.IsHardwareAccelerated) { Copy512(dst, src); return; }
        if (Vector256.IsHardwareAccelerated) { Copy256(dst, src); return; }
        if (Vector128.IsHardwareAccelerated) { Copy128(dst, src); return; }
        CopyScalar(dst, src);
    }

    /// <summary>Sets the 4096 bytes at <paramref name="p"/> to zero.</summary>
    /// <param name="p">The page.</param>
    // Why AggressiveOptimization: the kernels sit on every fault, copy and scan; tiered compilation
    // could leave them in unoptimized tier-0 code (no vector inlining) for a long time.
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Zero(byte* p)
    {
        Debug.Assert(p != null);
        if (Vector512.IsHardwareAccelerated) { Zero512(p); return; }
        if (Vector256.IsHardwareAccelerated) { Zero256(p); return; }
        if (Vector128.IsHardwareAccelerated) { Zero128(p); return; }
        ZeroScalar(p);
    }

    // ------------------------------------------------------------------------------------------------
    // Public span API: checks the length, pins, and calls the pointer kernel.
    // ------------------------------------------------------------------------------------------------

    /// <summary>Returns whether two pages hold the same bytes; see <see cref="PageEquals(byte*, byte*)"/>.</summary>
    /// <param name="a">The first page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <param name="b">The second page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <returns><see langword="true"/> iff all 4096 bytes are equal.</returns>
    /// <exception cref="ArgumentException">A span is not exactly <see cref="PageSize"/> bytes long.</exception>
    public static bool PageEquals(ReadOnlySpan<byte> a, ReadOnlySpan<byte> b)
    {
        CheckPage(a.Length, nameof(a));
        CheckPage(b.Length, nameof(b));
        fixed (byte* pa = a)
        fixed (byte* pb = b)
            return PageEquals(pa, pb);
    }

    /// <summary>Compares two pages in memcmp order; see <see cref="Compare(byte*, byte*)"/>.</summary>
    /// <param name="a">The first page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <param name="b">The second page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <returns>-1, 0 or 1 as the first differing byte (unsigned) of <paramref name="a"/> is smaller, absent or larger.</returns>
    /// <exception cref="ArgumentException">A span is not exactly <see cref="PageSize"/> bytes long.</exception>
    public static int Compare(ReadOnlySpan<byte> a, ReadOnlySpan<byte> b)
    {
        CheckPage(a.Length, nameof(a));
        CheckPage(b.Length, nameof(b));
        fixed (byte* pa = a)
        fixed (byte* pb = b)
            return Compare(pa, pb);
    }

    /// <summary>Returns whether all bytes of a page are zero; see <see cref="IsZero(byte*)"/>.</summary>
    /// <param name="page">The page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <returns><see langword="true"/> iff every byte is zero.</returns>
    /// <exception cref="ArgumentException"><paramref name="page"/> is not exactly <see cref="PageSize"/> bytes long.</exception>
    public static bool IsZero(ReadOnlySpan<byte> page)
    {
        CheckPage(page.Length, nameof(page));
        fixed (byte* p = page)
            return IsZero(p);
    }

    /// <summary>Computes the page checksum defined at <see cref="Checksum(byte*)"/>.</summary>
    /// <param name="page">The page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <returns>The checksum.</returns>
    /// <exception cref="ArgumentException"><paramref name="page"/> is not exactly <see cref="PageSize"/> bytes long.</exception>
    public static uint Checksum(ReadOnlySpan<byte> page)
    {
        CheckPage(page.Length, nameof(page));
        fixed (byte* p = page)
            return Checksum(p);
    }

    /// <summary>Copies one page; see <see cref="Copy(byte*, byte*)"/>.</summary>
    /// <param name="dst">The destination page; must be exactly <see cref="PageSize"/> bytes and not overlap <paramref name="src"/>.</param>
    /// <param name="src">The source page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <exception cref="ArgumentException">A span is not exactly <see cref="PageSize"/> bytes long.</exception>
    public static void Copy(Span<byte> dst, ReadOnlySpan<byte> src)
    {
        CheckPage(dst.Length, nameof(dst));
        CheckPage(src.Length, nameof(src));
        fixed (byte* pd = dst)
        fixed (byte* ps = src)
            Copy(pd, ps);
    }

    /// <summary>Sets all bytes of a page to zero; see <see cref="Zero(byte*)"/>.</summary>
    /// <param name="page">The page; must be exactly <see cref="PageSize"/> bytes.</param>
    /// <exception cref="ArgumentException"><paramref name="page"/> is not exactly <see cref="PageSize"/> bytes long.</exception>
    public static void Zero(Span<byte> page)
    {
        CheckPage(page.Length, nameof(page));
        fixed (byte* p = page)
            Zero(p);
    }

    private static void CheckPage(int length, string paramName)
    {
        if (length != PageSize)
            ThrowNotAPage(length, paramName);
    }

    [DoesNotReturn]
    private static void ThrowNotAPage(int length, string paramName) =>
        throw new ArgumentException($"A page is exactly {PageSize} bytes; this span has {length}.", paramName);

    // ------------------------------------------------------------------------------------------------
    // Explicit-width entry points, for tests and benchmarks of the non-default paths.
    // ------------------------------------------------------------------------------------------------

    /// <summary><see cref="PageEquals(byte*, byte*)"/> at an explicit width.</summary>
    internal static bool PageEquals(byte* a, byte* b, PageOpsWidth width) => width switch
    {
        PageOpsWidth.V512 => PageEquals512(a, b),
        PageOpsWidth.V256 => PageEquals256(a, b),
        PageOpsWidth.V128 => PageEquals128(a, b),
        _ => PageEqualsScalar(a, b),
    };

    /// <summary><see cref="Compare(byte*, byte*)"/> at an explicit width.</summary>
    internal static int Compare(byte* a, byte* b, PageOpsWidth width) => width switch
    {
        PageOpsWidth.V512 => Compare512(a, b),
        PageOpsWidth.V256 => Compare256(a, b),
        PageOpsWidth.V128 => Compare128(a, b),
        _ => CompareScalar(a, b),
    };

    /// <summary><see cref="IsZero(byte*)"/> at an explicit width.</summary>
    internal static bool IsZero(byte* p, PageOpsWidth width) => width switch
    {
        PageOpsWidth.V512 => IsZero512(p),
        PageOpsWidth.V256 => IsZero256(p),
        PageOpsWidth.V128 => IsZero128(p),
        _ => IsZeroScalar(p),
    };

    /// <summary><see cref="Copy(byte*, byte*)"/> at an explicit width.</summary>
    internal static void Copy(byte* dst, byte* src, PageOpsWidth width)
    {
        switch (width)
        {
            case PageOpsWidth.V512: Copy512(dst, src); break;
            case PageOpsWidth.V256: Copy256(dst, src); break;
            case PageOpsWidth.V128: Copy128(dst, src); break;
            default: CopyScalar(dst, src); break;
        }
    }

    /// <summary><see cref="Zero(byte*)"/> at an explicit width.</summary>
    internal static void Zero(byte* p, PageOpsWidth width)
    {
        switch (width)
        {
            case PageOpsWidth.V512: Zero512(p); break;
            case PageOpsWidth.V256: Zero256(p); break;
            case PageOpsWidth.V128: Zero128(p); break;
            default: ZeroScalar(p); break;
        }
    }

    /// <summary><see cref="Checksum(byte*)"/> with an explicit CRC32C implementation (see <see cref="IsSupported(PageOpsCrc)"/>).</summary>
    internal static uint Checksum(byte* p, PageOpsCrc crc) => crc switch
    {
        PageOpsCrc.Sse42X64 => ChecksumSse42(p),
        PageOpsCrc.Arm64 => ChecksumArm64(p),
        _ => ChecksumPortable(p),
    };

    // ------------------------------------------------------------------------------------------------
    // PageEquals kernels: XOR the pages block by block, OR the differences, test once per block.
    // ------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool PageEquals512(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 64)
        {
            Vector512<byte> d =
                ((Vector512.Load(a + i) ^ Vector512.Load(b + i)) | (Vector512.Load(a + i + 64) ^ Vector512.Load(b + i + 64))) |
                ((Vector512.Load(a + i + 128) ^ Vector512.Load(b + i + 128)) | (Vector512.Load(a + i + 192) ^ Vector512.Load(b + i + 192)));
            if (d != Vector512<byte>.Zero)
                return false;
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool PageEquals256(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 32)
        {
            Vector256<byte> d =
                ((Vector256.Load(a + i) ^ Vector256.Load(b + i)) | (Vector256.Load(a + i + 32) ^ Vector256.Load(b + i + 32))) |
                ((Vector256.Load(a + i + 64) ^ Vector256.Load(b + i + 64)) | (Vector256.Load(a + i + 96) ^ Vector256.Load(b + i + 96)));
            if (d != Vector256<byte>.Zero)
                return false;
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool PageEquals128(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 16)
        {
            Vector128<byte> d =
                ((Vector128.Load(a + i) ^ Vector128.Load(b + i)) | (Vector128.Load(a + i + 16) ^ Vector128.Load(b + i + 16))) |
                ((Vector128.Load(a + i + 32) ^ Vector128.Load(b + i + 32)) | (Vector128.Load(a + i + 48) ^ Vector128.Load(b + i + 48)));
            if (d != Vector128<byte>.Zero)
                return false;
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool PageEqualsScalar(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 8)
        {
            ulong d =
                ((Unsafe.ReadUnaligned<ulong>(a + i) ^ Unsafe.ReadUnaligned<ulong>(b + i)) | (Unsafe.ReadUnaligned<ulong>(a + i + 8) ^ Unsafe.ReadUnaligned<ulong>(b + i + 8))) |
                ((Unsafe.ReadUnaligned<ulong>(a + i + 16) ^ Unsafe.ReadUnaligned<ulong>(b + i + 16)) | (Unsafe.ReadUnaligned<ulong>(a + i + 24) ^ Unsafe.ReadUnaligned<ulong>(b + i + 24)));
            if (d != 0)
                return false;
        }
        return true;
    }

    // ------------------------------------------------------------------------------------------------
    // Compare kernels: the PageEquals loop; at the first block that differs, locate the first differing
    // byte (out of line, it runs at most once) and order by it.
    // ------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Compare512(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 64)
        {
            Vector512<byte> d =
                ((Vector512.Load(a + i) ^ Vector512.Load(b + i)) | (Vector512.Load(a + i + 64) ^ Vector512.Load(b + i + 64))) |
                ((Vector512.Load(a + i + 128) ^ Vector512.Load(b + i + 128)) | (Vector512.Load(a + i + 192) ^ Vector512.Load(b + i + 192)));
            if (d != Vector512<byte>.Zero)
                return OrderFirstDifference512(a + i, b + i);
        }
        return 0;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Compare256(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 32)
        {
            Vector256<byte> d =
                ((Vector256.Load(a + i) ^ Vector256.Load(b + i)) | (Vector256.Load(a + i + 32) ^ Vector256.Load(b + i + 32))) |
                ((Vector256.Load(a + i + 64) ^ Vector256.Load(b + i + 64)) | (Vector256.Load(a + i + 96) ^ Vector256.Load(b + i + 96)));
            if (d != Vector256<byte>.Zero)
                return OrderFirstDifference256(a + i, b + i);
        }
        return 0;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Compare128(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 16)
        {
            Vector128<byte> d =
                ((Vector128.Load(a + i) ^ Vector128.Load(b + i)) | (Vector128.Load(a + i + 16) ^ Vector128.Load(b + i + 16))) |
                ((Vector128.Load(a + i + 32) ^ Vector128.Load(b + i + 32)) | (Vector128.Load(a + i + 48) ^ Vector128.Load(b + i + 48)));
            if (d != Vector128<byte>.Zero)
                return OrderFirstDifference128(a + i, b + i);
        }
        return 0;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int CompareScalar(byte* a, byte* b)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 8)
        {
            ulong d =
                ((Unsafe.ReadUnaligned<ulong>(a + i) ^ Unsafe.ReadUnaligned<ulong>(b + i)) | (Unsafe.ReadUnaligned<ulong>(a + i + 8) ^ Unsafe.ReadUnaligned<ulong>(b + i + 8))) |
                ((Unsafe.ReadUnaligned<ulong>(a + i + 16) ^ Unsafe.ReadUnaligned<ulong>(b + i + 16)) | (Unsafe.ReadUnaligned<ulong>(a + i + 24) ^ Unsafe.ReadUnaligned<ulong>(b + i + 24)));
            if (d != 0)
                return OrderFirstDifferenceScalar(a + i, b + i);
        }
        return 0;
    }

    /// <summary>Orders the 4 x 8-byte blocks at <paramref name="a"/> and <paramref name="b"/>, which differ.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static int OrderFirstDifferenceScalar(byte* a, byte* b)
    {
        for (nuint i = 0; ; i += 8)
        {
            ulong x = Unsafe.ReadUnaligned<ulong>(a + i);
            ulong y = Unsafe.ReadUnaligned<ulong>(b + i);
            if (x != y)
                return OrderWords(x, y);
        }
    }

    /// <summary>Orders the 4 x 64-byte blocks at <paramref name="a"/> and <paramref name="b"/>, which differ.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static int OrderFirstDifference512(byte* a, byte* b)
    {
        for (nuint i = 0; ; i += 64)
        {
            ulong differ = ~Vector512.Equals(Vector512.Load(a + i), Vector512.Load(b + i)).ExtractMostSignificantBits();
            if (differ != 0)
                return OrderBytes(a, b, i + (nuint)BitOperations.TrailingZeroCount(differ));
        }
    }

    /// <summary>Orders the 4 x 32-byte blocks at <paramref name="a"/> and <paramref name="b"/>, which differ.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static int OrderFirstDifference256(byte* a, byte* b)
    {
        for (nuint i = 0; ; i += 32)
        {
            uint differ = ~Vector256.Equals(Vector256.Load(a + i), Vector256.Load(b + i)).ExtractMostSignificantBits();
            if (differ != 0)
                return OrderBytes(a, b, i + (nuint)BitOperations.TrailingZeroCount(differ));
        }
    }

    /// <summary>Orders the 4 x 16-byte blocks at <paramref name="a"/> and <paramref name="b"/>, which differ.</summary>
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static int OrderFirstDifference128(byte* a, byte* b)
    {
        for (nuint i = 0; ; i += 16)
        {
            // Only the low 16 bits of the mask are lanes.
            uint differ = ~Vector128.Equals(Vector128.Load(a + i), Vector128.Load(b + i)).ExtractMostSignificantBits() & 0xFFFFu;
            if (differ != 0)
                return OrderBytes(a, b, i + (nuint)BitOperations.TrailingZeroCount(differ));
        }
    }

    /// <summary>Orders two unequal 8-byte words by their first differing byte in memory (little-endian words).</summary>
    private static int OrderWords(ulong x, ulong y)
    {
        if (!BitConverter.IsLittleEndian)
            return x < y ? -1 : 1;
        int shift = BitOperations.TrailingZeroCount(x ^ y) & ~7;
        return (byte)(x >> shift) < (byte)(y >> shift) ? -1 : 1;
    }

    private static int OrderBytes(byte* a, byte* b, nuint index) => a[index] < b[index] ? -1 : 1;

    // ------------------------------------------------------------------------------------------------
    // IsZero kernels: OR 256 bytes together per step (128 for Vector128, 64 scalar), test once per step.
    // ------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool IsZero512(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 64)
        {
            Vector512<byte> v =
                (Vector512.Load(p + i) | Vector512.Load(p + i + 64)) |
                (Vector512.Load(p + i + 128) | Vector512.Load(p + i + 192));
            if (v != Vector512<byte>.Zero)
                return false;
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool IsZero256(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 8 * 32)
        {
            Vector256<byte> v =
                ((Vector256.Load(p + i) | Vector256.Load(p + i + 32)) | (Vector256.Load(p + i + 64) | Vector256.Load(p + i + 96))) |
                ((Vector256.Load(p + i + 128) | Vector256.Load(p + i + 160)) | (Vector256.Load(p + i + 192) | Vector256.Load(p + i + 224)));
            if (v != Vector256<byte>.Zero)
                return false;
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool IsZero128(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 8 * 16)
        {
            Vector128<byte> v =
                ((Vector128.Load(p + i) | Vector128.Load(p + i + 16)) | (Vector128.Load(p + i + 32) | Vector128.Load(p + i + 48))) |
                ((Vector128.Load(p + i + 64) | Vector128.Load(p + i + 80)) | (Vector128.Load(p + i + 96) | Vector128.Load(p + i + 112)));
            if (v != Vector128<byte>.Zero)
                return false;
        }
        return true;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool IsZeroScalar(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 8 * 8)
        {
            ulong v =
                ((Unsafe.ReadUnaligned<ulong>(p + i) | Unsafe.ReadUnaligned<ulong>(p + i + 8)) | (Unsafe.ReadUnaligned<ulong>(p + i + 16) | Unsafe.ReadUnaligned<ulong>(p + i + 24))) |
                ((Unsafe.ReadUnaligned<ulong>(p + i + 32) | Unsafe.ReadUnaligned<ulong>(p + i + 40)) | (Unsafe.ReadUnaligned<ulong>(p + i + 48) | Unsafe.ReadUnaligned<ulong>(p + i + 56)));
            if (v != 0)
                return false;
        }
        return true;
    }

    // ------------------------------------------------------------------------------------------------
    // Checksum kernels: four CRC32C streams over the page's words round-robin, one cache line (two words
    // per stream) per step, then the fold.
    // ------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StreamsSse42(byte* p, out ulong s0, out ulong s1, out ulong s2, out ulong s3)
    {
        ulong* w = (ulong*)p;
        s0 = ChecksumSeed; s1 = ChecksumSeed; s2 = ChecksumSeed; s3 = ChecksumSeed;
        for (nuint i = 0; i < PageSize / sizeof(ulong); i += 8)
        {
            s0 = Sse42.X64.Crc32(s0, Unsafe.ReadUnaligned<ulong>(w + i));
            s1 = Sse42.X64.Crc32(s1, Unsafe.ReadUnaligned<ulong>(w + i + 1));
            s2 = Sse42.X64.Crc32(s2, Unsafe.ReadUnaligned<ulong>(w + i + 2));
            s3 = Sse42.X64.Crc32(s3, Unsafe.ReadUnaligned<ulong>(w + i + 3));
            s0 = Sse42.X64.Crc32(s0, Unsafe.ReadUnaligned<ulong>(w + i + 4));
            s1 = Sse42.X64.Crc32(s1, Unsafe.ReadUnaligned<ulong>(w + i + 5));
            s2 = Sse42.X64.Crc32(s2, Unsafe.ReadUnaligned<ulong>(w + i + 6));
            s3 = Sse42.X64.Crc32(s3, Unsafe.ReadUnaligned<ulong>(w + i + 7));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint ChecksumSse42(byte* p)
    {
        StreamsSse42(p, out ulong s0, out ulong s1, out ulong s2, out ulong s3);
        ulong f = Sse42.X64.Crc32(ChecksumSeed, s0 | s1 << 32);
        f = Sse42.X64.Crc32(f, s2 | s3 << 32);
        return ~(uint)f;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ulong Checksum64Sse42(byte* p)
    {
        StreamsSse42(p, out ulong s0, out ulong s1, out ulong s2, out ulong s3);
        ulong hi = Sse42.X64.Crc32(ChecksumSeed, s0 | s1 << 32);
        ulong lo = Sse42.X64.Crc32(ChecksumSeed, s2 | s3 << 32);
        return ~(hi << 32 | lo);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StreamsArm64(byte* p, out uint s0, out uint s1, out uint s2, out uint s3)
    {
        ulong* w = (ulong*)p;
        s0 = ChecksumSeed; s1 = ChecksumSeed; s2 = ChecksumSeed; s3 = ChecksumSeed;
        for (nuint i = 0; i < PageSize / sizeof(ulong); i += 8)
        {
            s0 = Crc32.Arm64.ComputeCrc32C(s0, Unsafe.ReadUnaligned<ulong>(w + i));
            s1 = Crc32.Arm64.ComputeCrc32C(s1, Unsafe.ReadUnaligned<ulong>(w + i + 1));
            s2 = Crc32.Arm64.ComputeCrc32C(s2, Unsafe.ReadUnaligned<ulong>(w + i + 2));
            s3 = Crc32.Arm64.ComputeCrc32C(s3, Unsafe.ReadUnaligned<ulong>(w + i + 3));
            s0 = Crc32.Arm64.ComputeCrc32C(s0, Unsafe.ReadUnaligned<ulong>(w + i + 4));
            s1 = Crc32.Arm64.ComputeCrc32C(s1, Unsafe.ReadUnaligned<ulong>(w + i + 5));
            s2 = Crc32.Arm64.ComputeCrc32C(s2, Unsafe.ReadUnaligned<ulong>(w + i + 6));
            s3 = Crc32.Arm64.ComputeCrc32C(s3, Unsafe.ReadUnaligned<ulong>(w + i + 7));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint ChecksumArm64(byte* p)
    {
        StreamsArm64(p, out uint s0, out uint s1, out uint s2, out uint s3);
        uint f = Crc32.Arm64.ComputeCrc32C(ChecksumSeed, s0 | (ulong)s1 << 32);
        f = Crc32.Arm64.ComputeCrc32C(f, s2 | (ulong)s3 << 32);
        return ~f;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ulong Checksum64Arm64(byte* p)
    {
        StreamsArm64(p, out uint s0, out uint s1, out uint s2, out uint s3);
        ulong hi = Crc32.Arm64.ComputeCrc32C(ChecksumSeed, s0 | (ulong)s1 << 32);
        ulong lo = Crc32.Arm64.ComputeCrc32C(ChecksumSeed, s2 | (ulong)s3 << 32);
        return ~(hi << 32 | lo);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StreamsPortable(byte* p, out uint s0, out uint s1, out uint s2, out uint s3)
    {
        // BitOperations consumes a ulong as its little-endian bytes; on a big-endian machine the word read
        // from memory must be byte-swapped to keep the bytes in address order.
        ulong* w = (ulong*)p;
        s0 = ChecksumSeed; s1 = ChecksumSeed; s2 = ChecksumSeed; s3 = ChecksumSeed;
        for (nuint i = 0; i < PageSize / sizeof(ulong); i += 4)
        {
            s0 = BitOperations.Crc32C(s0, LittleEndianWord(w + i));
            s1 = BitOperations.Crc32C(s1, LittleEndianWord(w + i + 1));
            s2 = BitOperations.Crc32C(s2, LittleEndianWord(w + i + 2));
            s3 = BitOperations.Crc32C(s3, LittleEndianWord(w + i + 3));
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint ChecksumPortable(byte* p)
    {
        StreamsPortable(p, out uint s0, out uint s1, out uint s2, out uint s3);
        uint f = BitOperations.Crc32C(ChecksumSeed, s0 | (ulong)s1 << 32);
        f = BitOperations.Crc32C(f, s2 | (ulong)s3 << 32);
        return ~f;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ulong Checksum64Portable(byte* p)
    {
        StreamsPortable(p, out uint s0, out uint s1, out uint s2, out uint s3);
        ulong hi = BitOperations.Crc32C(ChecksumSeed, s0 | (ulong)s1 << 32);
        ulong lo = BitOperations.Crc32C(ChecksumSeed, s2 | (ulong)s3 << 32);
        return ~(hi << 32 | lo);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ulong LittleEndianWord(ulong* p)
    {
        ulong v = Unsafe.ReadUnaligned<ulong>(p);
        return BitConverter.IsLittleEndian ? v : System.Buffers.Binary.BinaryPrimitives.ReverseEndianness(v);
    }

    // ------------------------------------------------------------------------------------------------
    // Copy kernels: four loads, then four stores, per step.
    // ------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Copy512(byte* dst, byte* src)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 64)
        {
            Vector512<byte> v0 = Vector512.Load(src + i);
            Vector512<byte> v1 = Vector512.Load(src + i + 64);
            Vector512<byte> v2 = Vector512.Load(src + i + 128);
            Vector512<byte> v3 = Vector512.Load(src + i + 192);
            v0.Store(dst + i);
            v1.Store(dst + i + 64);
            v2.Store(dst + i + 128);
            v3.Store(dst + i + 192);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Copy256(byte* dst, byte* src)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 32)
        {
            Vector256<byte> v0 = Vector256.Load(src + i);
            Vector256<byte> v1 = Vector256.Load(src + i + 32);
            Vector256<byte> v2 = Vector256.Load(src + i + 64);
            Vector256<byte> v3 = Vector256.Load(src + i + 96);
            v0.Store(dst + i);
            v1.Store(dst + i + 32);
            v2.Store(dst + i + 64);
            v3.Store(dst + i + 96);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Copy128(byte* dst, byte* src)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 16)
        {
            Vector128<byte> v0 = Vector128.Load(src + i);
            Vector128<byte> v1 = Vector128.Load(src + i + 16);
            Vector128<byte> v2 = Vector128.Load(src + i + 32);
            Vector128<byte> v3 = Vector128.Load(src + i + 48);
            v0.Store(dst + i);
            v1.Store(dst + i + 16);
            v2.Store(dst + i + 32);
            v3.Store(dst + i + 48);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyScalar(byte* dst, byte* src)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 8)
        {
            ulong v0 = Unsafe.ReadUnaligned<ulong>(src + i);
            ulong v1 = Unsafe.ReadUnaligned<ulong>(src + i + 8);
            ulong v2 = Unsafe.ReadUnaligned<ulong>(src + i + 16);
            ulong v3 = Unsafe.ReadUnaligned<ulong>(src + i + 24);
            Unsafe.WriteUnaligned(dst + i, v0);
            Unsafe.WriteUnaligned(dst + i + 8, v1);
            Unsafe.WriteUnaligned(dst + i + 16, v2);
            Unsafe.WriteUnaligned(dst + i + 24, v3);
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Zero kernels: four stores of a zero vector per step.
    // ------------------------------------------------------------------------------------------------

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Zero512(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 64)
        {
            Vector512<byte>.Zero.Store(p + i);
            Vector512<byte>.Zero.Store(p + i + 64);
            Vector512<byte>.Zero.Store(p + i + 128);
            Vector512<byte>.Zero.Store(p + i + 192);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Zero256(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 32)
        {
            Vector256<byte>.Zero.Store(p + i);
            Vector256<byte>.Zero.Store(p + i + 32);
            Vector256<byte>.Zero.Store(p + i + 64);
            Vector256<byte>.Zero.Store(p + i + 96);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Zero128(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 16)
        {
            Vector128<byte>.Zero.Store(p + i);
            Vector128<byte>.Zero.Store(p + i + 16);
            Vector128<byte>.Zero.Store(p + i + 32);
            Vector128<byte>.Zero.Store(p + i + 48);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void ZeroScalar(byte* p)
    {
        for (nuint i = 0; i < PageSize; i += 4 * 8)
        {
            Unsafe.WriteUnaligned(p + i, 0UL);
            Unsafe.WriteUnaligned(p + i + 8, 0UL);
            Unsafe.WriteUnaligned(p + i + 16, 0UL);
            Unsafe.WriteUnaligned(p + i + 24, 0UL);
        }
    }
}
