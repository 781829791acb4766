// DemoBuffer: what the KSM demo's processes hold, page by page. Every process maps one buffer of the
// same size, laid out in four regions, so that each kind of duplication KSM meets in real workloads is
// there and the savings can be predicted exactly:
//
//   library   3/8  the same "shared library image" in every process   -> one KSM page per page, N mappings
//   zero      1/8  zero-filled pages (written, so they are real frames) -> a few KSM pages (max_page_sharing
//                  caps one at 256 mappings), or the zero page with use_zero_pages
//   repeated  1/4  a pool of distinct pages, each repeated 16 times within its own process
//   unique    1/4  random data that never merges (it ends in pages_unshared, then smart_scan skips it)
//
// Page contents are pseudo-random from a seed (xorshift64*), so a page is rebuilt, not stored.
using System.Runtime.InteropServices;
using Vmm.Native;

namespace Vmm.Cli;

/// <summary>The layout of one demo buffer, and the content of each of its pages.</summary>
internal sealed class DemoBuffer
{
    /// <summary>Copies of each page of the repeated region within one process.</summary>
    public const int RepeatCopies = 16;

    public const int PageSize = Topology.PageSize;

    public DemoBuffer(int pages, int processes)
    {
        Pages = pages;
        Processes = processes;
        Library = pages * 3 / 8;
        Zero = pages / 8;
        RepeatPool = Math.Max(1, pages / 4 / RepeatCopies);
        Repeated = RepeatPool * RepeatCopies;
        Unique = pages - Library - Zero - Repeated;
    }

    /// <summary>Pages per process.</summary>
    public int Pages { get; }

    /// <summary>Processes holding such a buffer.</summary>
    public int Processes { get; }

    /// <summary>Pages of the library image (region 1, from page 0).</summary>
    public int Library { get; }

    /// <summary>Zero-filled pages (region 2).</summary>
    public int Zero { get; }

    /// <summary>Pages of the repeated region (region 3): <see cref="RepeatPool"/> contents x <see cref="RepeatCopies"/>.</summary>
    public int Repeated { get; }

    /// <summary>Distinct contents in one process's repeated region.</summary>
    public int RepeatPool { get; }

    /// <summary>Unique random pages (region 4, to the end).</summary>
    public int Unique { get; }

    public int ZeroStart => Library;

    public int RepeatedStart => Library + Zero;

    public int UniqueStart => Library + Zero + Repeated;

    /// <summary>
    /// The pages merging can save over all processes (each content kept once). Zero pages count all but
    /// one page per <paramref name="maxPageSharing"/> mappings, or every mapping with use_zero_pages.
    /// </summary>
    public long SaveablePages(bool useZeroPages, int maxPageSharing)
    {
        long zeroMappings = (long)Zero * Processes;
        long zeroSaved = useZeroPages ? zeroMappings : zeroMappings - (zeroMappings + maxPageSharing - 1) / maxPageSharing;
        return (long)Library * (Processes - 1) + (long)Processes * (Repeated - RepeatPool) + zeroSaved;
    }

    /// <summary>Writes page <paramref name="page"/> of process number <paramref name="process"/> (0-based) into <paramref name="destination"/>.</summary>
    public void FillPage(int process, int page, Span<byte> destination)
    {
        if (page < ZeroStart)
            FillRandom(destination, Seed(1, 0, page));
        else if (page < RepeatedStart)
            destination.Clear();
        else if (page < UniqueStart)
            FillRandom(destination, Seed(2, process, (page - RepeatedStart) % RepeatPool));
        else
            FillRandom(destination, Seed(3, process, page));
    }

    /// <summary>A seed per (region, process, index): distinct inputs give distinct pages.</summary>
    private static ulong Seed(int region, int process, int index) =>
        ((ulong)region << 56) | ((ulong)(uint)process << 32) | (uint)index;

    /// <summary>Pseudo-random bytes from a seed (xorshift64*, seed mixed by a golden-ratio multiply).</summary>
    public static void FillRandom(Span<byte> page, ulong seed)
    {
        Span<ulong> words = MemoryMarshal.Cast<byte, ulong>(page);
        ulong x = (seed + 1) * 0x9E3779B97F4A7C15UL | 1;
        for (int i = 0; i < words.Length; i++)
        {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            words[i] = x * 0x2545F4914F6CDD1DUL;
        }
    }
}
