using Vmm.Mm;

namespace Vmm.Tests.Robustness;

/// <summary>The expected contents of one page; shared between processes that share the page (MAP_SHARED across fork).</summary>
internal sealed class ShadowPage
{
    public byte[] Data = new byte[ShadowProcess.Page];

    public ShadowPage Clone() => new() { Data = (byte[])Data.Clone() };
}

/// <summary>What the oracle knows of one mapped page: its protection, its contents, whether it is MAP_SHARED.</summary>
internal readonly record struct ShadowEntry(Protection Prot, ShadowPage Contents, bool Shared)
{
    /// <summary>PROT_WRITE implies read, as on x86; PROT_EXEC alone is not used by the tests.</summary>
    public bool CanRead => (Prot & (Protection.Read | Protection.Write)) != 0;

    public bool CanWrite => (Prot & Protection.Write) != 0;
}

/// <summary>
/// The shadow oracle of one process's memory (shared by the model test and the API fuzzer): every mapped
/// page's protection and expected bytes, with Linux's rules for mmap, munmap, mprotect (stops at the first
/// hole, keeping what it changed before it), madvise(DONTNEED) (private pages read zero again, shared ones
/// keep their contents), partial writes (everything before the faulting page is written) and fork
/// (private pages copied, shared pages shared).
/// </summary>
internal sealed class ShadowProcess
{
    public const ulong Page = 4096;

    public required VmProcess Process;

    /// <summary>Page address -> what the page holds.</summary>
    public Dictionary<ulong, ShadowEntry> Pages = [];

    /// <summary>The child's shadow after fork: private pages copied, shared ones shared.</summary>
    public ShadowProcess Fork(VmProcess child)
    {
        var copy = new ShadowProcess { Process = child };
        foreach ((ulong a, ShadowEntry entry) in Pages)
            copy.Pages[a] = entry with { Contents = entry.Shared ? entry.Contents : entry.Contents.Clone() };
        return copy;
    }

    /// <summary>The page addresses mapped in [start, start + length), in order (a huge length costs only what is mapped).</summary>
    public List<ulong> MappedIn(ulong start, ulong length)
    {
        ulong end = End(start, length);
        return [.. Pages.Keys.Where(a => a + Page > start && a < end).Order()];
    }

    /// <summary>mmap succeeded at [start, start + length): new zeroed pages, replacing whatever was there (MAP_FIXED).</summary>
    public void Map(ulong start, ulong length, Protection prot, bool shared)
    {
        for (ulong a = start; a < End(start, length); a += Page)
            Pages[a] = new ShadowEntry(prot, new ShadowPage(), shared);
    }

    /// <summary>munmap succeeded.</summary>
    public void Unmap(ulong start, ulong length)
    {
        foreach (ulong a in MappedIn(start, length))
            Pages.Remove(a);
    }

    /// <summary>mprotect's effect and expected errno: ENOMEM at the first hole, after changing the pages before it.</summary>
    public Errno Protect(ulong start, ulong length, Protection prot)
    {
        for (ulong a = start; a < End(start, length); a += Page)
        {
            if (!Pages.TryGetValue(a, out ShadowEntry entry))
                return Errno.ENOMEM;
            Pages[a] = entry with { Prot = prot };
        }
        return Errno.None;
    }

    /// <summary>madvise(DONTNEED)'s effect and expected errno: every mapped private page reads zero again; ENOMEM if a page is unmapped.</summary>
    public Errno DontNeed(ulong start, ulong length)
    {
        List<ulong> mapped = MappedIn(start, length);
        foreach (ulong a in mapped)
        {
            ShadowEntry entry = Pages[a];
            if (!entry.Shared)
                Pages[a] = entry with { Contents = new ShadowPage() };
        }
        ulong pages = (End(start, length) - start) / Page;
        return (ulong)mapped.Count == pages ? Errno.None : Errno.ENOMEM;
    }

    /// <summary>Where an access of [start, start + length) must fault (the first byte of the first page that does not allow it), or null.</summary>
    public ulong? FirstFault(ulong start, ulong length, bool write)
    {
        if (length == 0)
            return null;
        ulong end = start + length < start ? ulong.MaxValue : start + length;
        for (ulong a = start & ~(Page - 1); a < end; a += Page)
        {
            if (!Pages.TryGetValue(a, out ShadowEntry entry) || !(write ? entry.CanWrite : entry.CanRead))
                return Math.Max(a, start);
            if (a + Page < a)
                break;
        }
        return null;
    }

    /// <summary>A write of <paramref name="data"/> at <paramref name="start"/> reached <paramref name="end"/> (exclusive).</summary>
    public void Store(ulong start, ReadOnlySpan<byte> data, ulong end)
    {
        for (ulong a = start; a < end; a++)
            Pages[a & ~(Page - 1)].Contents.Data[a & (Page - 1)] = data[(int)(a - start)];
    }

    /// <summary>A fill with <paramref name="value"/> reached [start, end).</summary>
    public void Fill(ulong start, ulong end, byte value)
    {
        for (ulong a = start; a < end;)
        {
            ulong pageEnd = Math.Min(end, (a & ~(Page - 1)) + Page);
            Pages[a & ~(Page - 1)].Contents.Data.AsSpan((int)(a & (Page - 1)), (int)(pageEnd - a)).Fill(value);
            a = pageEnd;
        }
    }

    /// <summary>Null if the bytes read from [start, end) are what the shadow says; otherwise where they differ.</summary>
    public string? Compare(ulong start, ReadOnlySpan<byte> data, ulong end)
    {
        for (ulong a = start; a < end; a++)
        {
            byte expected = Pages[a & ~(Page - 1)].Contents.Data[a & (Page - 1)];
            if (data[(int)(a - start)] != expected)
                return $"byte at 0x{a:x} of {Process} reads {data[(int)(a - start)]}, the shadow says {expected}";
        }
        return null;
    }

    /// <summary>
    /// Null if every byte of every readable page is what the shadow says; otherwise the first difference.
    /// With <paramref name="skipOutOfMemory"/>, a page whose read fault finds no frame (a full machine) is skipped.
    /// </summary>
    public string? CompareAll(bool skipOutOfMemory = false)
    {
        var page = new byte[Page];
        foreach ((ulong a, ShadowEntry entry) in Pages.OrderBy(p => p.Key))
        {
            if (!entry.CanRead)
                continue;
            try
            {
                Process.Read(a, page);
            }
            catch (InsufficientMemoryException) when (skipOutOfMemory)
            {
                continue;
            }
            if (!page.AsSpan().SequenceEqual(entry.Contents.Data))
                return Compare(a, page, a + Page);
        }
        return null;
    }

    private static ulong End(ulong start, ulong length)
    {
        ulong aligned = (length + Page - 1) & ~(Page - 1);
        ulong end = start + aligned;
        return end < start ? ulong.MaxValue & ~(Page - 1) : end;
    }
}
