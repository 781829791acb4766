using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// Addresses outside user space (at or above TASK_SIZE, non-canonical ones included) fault as on Linux
/// in every path. The page walk indexes 9 bits per level, so without the checks an address with any of
/// bits 47-63 set reached the mapping at its low 47 bits.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class AddressValidationTests
{
    private const ulong Page = 4096;
    private const ulong TaskSize = 0x7FFF_FFFF_F000;

    private Machine _machine = null!;
    private VmProcess _p = null!;
    private ulong _va;

    [SetUp]
    public void SetUp()
    {
        // Both pages present: a walk that ignored the high bits would find them.
        (_machine, _p, _va, _) = TestMachines.CreateWithRegion(2 * Page, fill: 0x5A);
    }

    [TearDown]
    public void TearDown()
    {
        Assert.That(_machine.Audit(), Is.Empty, "a refused access leaves everything consistent");
        _machine.Dispose();
    }

    /// <summary>Each of bits 47..63 set on a mapped address.</summary>
    private static IEnumerable<int> HighBits() => Enumerable.Range(47, 17);

    private void AssertUntouched(string because)
    {
        byte[] back = new byte[2 * Page];
        _p.Read(_va, back);
        Assert.That(back, Is.All.EqualTo(0x5A), because);
    }

    private static void AssertMapError(Action access, ulong address, AccessKind kind, string because)
    {
        var fault = Assert.Throws<SegmentationFault>(() => access(), because);
        Assert.That((fault!.Address, fault.Kind, fault.Reason), Is.EqualTo((address, kind, SegvReason.MapError)), because);
    }

    [Test]
    public void Every_access_path_faults_on_an_address_with_a_high_bit_set([ValueSource(nameof(HighBits))] int bit)
    {
        ulong bad = _va | (1UL << bit);
        AssertMapError(() => _p.Read(bad, new byte[16]), bad, AccessKind.Read, "Read");
        AssertMapError(() => _p.Read<long>(bad), bad, AccessKind.Read, "Read<T>");
        AssertMapError(() => _p.Write(bad, new byte[16]), bad, AccessKind.Write, "Write");
        AssertMapError(() => _p.Write<long>(bad, -1), bad, AccessKind.Write, "Write<T>");
        AssertMapError(() => _p.Fill(bad, 16, 0xFF), bad, AccessKind.Write, "Fill");
        AssertMapError(() => _p.Pin(bad, 16, write: false), bad, AccessKind.Read, "Pin for read");
        AssertMapError(() => _p.Pin(bad, 16, write: true), bad, AccessKind.Write, "Pin for write");
        AssertUntouched("no write reached the mapping at the low bits");
        Assert.That(_p.GetPagemap(_va).Pinned, Is.Zero, "nothing was pinned");
    }

    [Test]
    public void Pagemap_of_an_address_with_a_high_bit_set_shows_nothing_mapped([ValueSource(nameof(HighBits))] int bit)
    {
        Assert.That(_p.GetPagemap(_va).Present, Is.True);
        PagemapEntry entry = _p.GetPagemap(_va | (1UL << bit));
        Assert.That((entry.Present, entry.Pfn, entry.Node), Is.EqualTo((false, -1L, -1)), "Linux's pagemap has no entries beyond TASK_SIZE");
    }

    [Test]
    public void Syscalls_on_an_address_with_a_high_bit_set_return_Linux_errnos([ValueSource(nameof(HighBits))] int bit)
    {
        ulong bad = _va | (1UL << bit);
        Assert.That(_p.Madvise(bad, Page, Advice.DontNeed), Is.EqualTo(Errno.ENOMEM), "madvise: nothing is mapped there");
        Assert.That(_p.Mprotect(bad, Page, Protection.None), Is.EqualTo(Errno.ENOMEM), "mprotect: nothing is mapped there");
        Assert.That(_p.Munmap(bad, Page), Is.EqualTo(Errno.EINVAL), "munmap: the range is not in user space");
        Assert.That(_p.SetDedupeDomain(bad, Page, 3), Is.EqualTo(Errno.ENOMEM), "as madvise: nothing is mapped there");
        Assert.That(_p.Mmap(bad, Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.ENOMEM), "MAP_FIXED outside user space");
        Assert.That(_p.Mmap(bad, Page, Protection.ReadWrite, MapFlags.Private, out ulong hinted), Is.EqualTo(Errno.None));
        Assert.That(hinted, Is.LessThan(TaskSize), "a hint outside user space is ignored");
        Assert.That(_p.Munmap(hinted, Page), Is.EqualTo(Errno.None));
        AssertUntouched("the mapping at the low bits was not advised away, protected or unmapped");
        _p.Write<byte>(_va, 0x5A); // still writable
        Assert.That(_p.Mm.VmaAt(_va)!.KsmDomain, Is.Zero, "its dedupe domain did not change");
    }

    [Test]
    public void An_access_running_into_TASK_SIZE_faults_at_TASK_SIZE_after_the_part_below()
    {
        ulong top = TaskSize - 2 * Page;
        Assert.That(_p.Mmap(top, 2 * Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.None));
        _p.Fill(top, 2 * Page, 7);
        AssertMapError(() => _p.Write(TaskSize - 2, new byte[] { 1, 2, 3, 4 }), TaskSize, AccessKind.Write, "Write across TASK_SIZE");
        Assert.That(_p.Read<byte>(TaskSize - 1), Is.EqualTo(2), "the part below TASK_SIZE was written, as on Linux");
        AssertMapError(() => _p.Read<long>(TaskSize - 4), TaskSize, AccessKind.Read, "Read<T> straddling TASK_SIZE");
        AssertMapError(() => _p.Write<long>(TaskSize - 4, 1), TaskSize, AccessKind.Write, "Write<T> straddling TASK_SIZE");
        AssertMapError(() => _p.Read(top, new byte[4 * Page]), TaskSize, AccessKind.Read, "a run of adjacent frames stops at TASK_SIZE");
        AssertMapError(() => _p.Fill(top, 3 * Page, 9), TaskSize, AccessKind.Write, "Fill across TASK_SIZE");
        AssertMapError(() => _p.Pin(top, 3 * Page, write: true), TaskSize, AccessKind.Write, "Pin across TASK_SIZE");
        Assert.That(_p.GetPagemap(top).Pinned, Is.Zero, "nothing stays pinned");
        Assert.That(_p.GetPagemap(TaskSize).Present, Is.False);
    }

    [Test]
    public void Accesses_whose_range_wraps_past_2_to_the_64_never_reach_a_mapping()
    {
        ulong nearTop = ulong.MaxValue - Page + 1; // the last page of the 64-bit space
        AssertMapError(() => _p.Read(nearTop + 0x800, new byte[2 * Page]), nearTop + 0x800, AccessKind.Read, "Read that would wrap to 0");
        AssertMapError(() => _p.Write(nearTop, new byte[2 * Page + 0x20000]), nearTop, AccessKind.Write, "Write that would wrap onto low memory");
        AssertMapError(() => _p.Read<long>(ulong.MaxValue - 3), ulong.MaxValue - 3, AccessKind.Read, "a value straddling 2^64");
        AssertMapError(() => _p.Fill(nearTop, 2 * Page, 1), nearTop, AccessKind.Write, "Fill from the top");
        var fill = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Fill(_va, ulong.MaxValue, 1), "a length that wraps from a user address");
        Assert.That(fill!.ParamName, Is.EqualTo("length"));
        var pin = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Pin(_va, ulong.MaxValue, write: false));
        Assert.That(pin!.ParamName, Is.EqualTo("length"));
        AssertUntouched("nothing was written");
    }

    [Test]
    public void An_empty_access_touches_nothing_and_never_faults()
    {
        _p.Read(ulong.MaxValue, Span<byte>.Empty);
        _p.Write(1UL << 63, ReadOnlySpan<byte>.Empty);
        _p.Fill(1UL << 50, 0, 1);
        AssertUntouched("an empty access changes nothing");
    }

    /// <summary>Found by the API fuzzer: Pin(0xfff, ...) over an unmapped page reported 0x0, outside the range.</summary>
    [Test]
    public void A_pin_starting_inside_an_unmapped_page_faults_at_its_first_byte_like_an_access()
    {
        ulong hole = _va - Page + 0xFFF; // the last byte of the unmapped page below the mapping
        AssertMapError(() => _p.Pin(hole, 3 * Page, write: true).Dispose(), hole, AccessKind.Write, "Pin (write)");
        AssertMapError(() => _p.Pin(hole, 1, write: false).Dispose(), hole, AccessKind.Read, "Pin (read)");
        AssertMapError(() => _p.Read(hole, new byte[16]), hole, AccessKind.Read, "Read faults at the same byte");
    }
}
