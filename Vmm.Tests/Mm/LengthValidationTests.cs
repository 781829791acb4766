using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// Every range argument: a length that overflows is ArgumentOutOfRangeException (throwing calls) or the
/// errno (syscall-shaped calls), never OverflowException or IndexOutOfRangeException; Pin costs what it
/// pins, not what the length says; a failed pin leaves nothing pinned; Audit notices a frame nobody owns.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class LengthValidationTests
{
    private const ulong Page = 4096;

    private Machine _machine = null!;
    private VmProcess _p = null!;
    private ulong _va;

    [SetUp]
    public void SetUp()
    {
        (_machine, _p, _va, _) = TestMachines.CreateWithRegion(Page);
        _p.Write<byte>(_va, 1);
    }

    [TearDown]
    public void TearDown()
    {
        _machine.Dispose();
    }

    private void AssertAuditClean() => TestMachines.AssertAuditClean(_machine);

    // ============================================================================================
    // Pin
    // ============================================================================================

    [Test]
    public void A_pin_of_a_terabyte_over_one_page_faults_at_the_first_unmapped_page_without_allocating_for_the_length()
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        var fault = Assert.Throws<SegmentationFault>(() => _p.Pin(_va, 1UL << 40, write: true));
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.That((fault!.Address, fault.Reason), Is.EqualTo((_va + Page, SegvReason.MapError)));
        Assert.That(allocated, Is.LessThan(256 * 1024), "O(pages pinned) of host memory, not 8 bytes per page of the length");
        Assert.That(_p.GetPagemap(_va).Pinned, Is.Zero, "the page pinned before the fault was unpinned");
        AssertAuditClean();
    }

    [Test]
    public void A_pin_longer_than_any_pin_can_hold_is_an_argument_error_not_an_OverflowException()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Pin(_va, 1UL << 46, write: false));
        Assert.That(e!.ParamName, Is.EqualTo("length"));
        var zero = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Pin(_va, 0, write: false));
        Assert.That(zero!.ParamName, Is.EqualTo("length"));
        AssertAuditClean();
    }

    [Test]
    public void A_pin_that_fails_part_way_leaves_nothing_pinned()
    {
        ulong three = _p.Mmap(3 * Page);
        Assert.That(_p.Munmap(three + 2 * Page, Page), Is.EqualTo(Errno.None));
        Assert.Throws<SegmentationFault>(() => _p.Pin(three, 3 * Page, write: true));
        Assert.That(_p.GetPagemap(three).Pinned + _p.GetPagemap(three + Page).Pinned, Is.Zero);
        AssertAuditClean();
        Assert.That(_p.Mprotect(three + Page, Page, Protection.Read), Is.EqualTo(Errno.None));
        var denied = Assert.Throws<SegmentationFault>(() => _p.Pin(three, 2 * Page, write: true));
        Assert.That(denied!.Reason, Is.EqualTo(SegvReason.AccessError));
        Assert.That(_p.GetPagemap(three).Pinned, Is.Zero);
        AssertAuditClean();
    }

    [Test]
    public void Page_indexes_of_a_pin_out_of_range_are_argument_errors_naming_the_index_never_IndexOutOfRange()
    {
        using (PinnedMemory pin = _p.Pin(_va, Page, write: true))
        {
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => pin.FrameOf(1))!.ParamName, Is.EqualTo("index"));
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => pin.FrameOf(-1))!.ParamName, Is.EqualTo("index"));
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => pin.GetSpan(1))!.ParamName, Is.EqualTo("index"));
        }
        using var store = new DedupeStore(_machine);
        VmmBuffer buffer = store.Allocate(100);
        using PinnedBuffer pinned = buffer.Pin(writable: true);
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => pinned.GetSpan(1))!.ParamName, Is.EqualTo("page"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => pinned.GetReadOnlySpan(-1))!.ParamName, Is.EqualTo("page"));
    }

    // ============================================================================================
    // Audit: orphans
    // ============================================================================================

    [Test]
    public void Audit_reports_a_frame_that_nothing_owns()
    {
        long leaked = _machine.Allocator.AllocPages(0, AllocFlags.Movable);
        Assert.That(leaked, Is.Not.EqualTo(PageAllocator.NoPfn));
        Assert.That(_machine.Audit(), Has.Some.Contains($"frame {leaked} is in use").And.Some.Contains("orphan"));
        _machine.PutPage(leaked);
        AssertAuditClean();
    }

    [Test]
    public void Audit_reports_a_reference_leaked_on_a_frame_held_only_by_a_pin()
    {
        PinnedMemory pin = _p.Pin(_va, Page, write: true);
        long pfn = pin.FrameOf(0);
        Assert.That(_p.Munmap(_va, Page), Is.EqualTo(Errno.None));
        AssertAuditClean(); // the pin alone holds the frame: a legitimate owner
        _machine.MemMap.GetPage(pfn); // a reference nobody will drop
        Assert.That(_machine.Audit(), Has.Some.Contains($"frame {pfn}: refcount 2, but only its 1 pins hold it"));
        _machine.PutPage(pfn);
        pin.Dispose();
        AssertAuditClean();
    }

    // ============================================================================================
    // The other range arguments
    // ============================================================================================

    [Test]
    public void Fill_with_a_length_that_wraps_is_an_argument_error_and_fills_nothing()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Fill(_va, ulong.MaxValue - _va + 2, 9));
        Assert.That(e!.ParamName, Is.EqualTo("length"));
        Assert.That(_p.Read<byte>(_va), Is.EqualTo(1));
        var fault = Assert.Throws<SegmentationFault>(() => _p.Fill(_va, 1UL << 40, 9), "a huge length that does not wrap fills until the hole");
        Assert.That(fault!.Address, Is.EqualTo(_va + Page));
        AssertAuditClean();
    }

    [Test]
    public void SetDedupeDomain_with_a_length_near_2_to_the_64_is_EINVAL_as_madvise()
    {
        Assert.That(_p.SetDedupeDomain(_va, ulong.MaxValue, 5), Is.EqualTo(Errno.EINVAL), "rounding up to pages wraps");
        Assert.That(_p.SetDedupeDomain(_va, ulong.MaxValue - Page - _va + 2, 5), Is.EqualTo(Errno.EINVAL), "start + length wraps");
        Assert.That(_p.SetDedupeDomain(_va + 1, Page, 5), Is.EqualTo(Errno.EINVAL), "misaligned");
        Assert.That(_p.SetDedupeDomain(_va, 0, 5), Is.EqualTo(Errno.None), "empty");
        Assert.That(_p.Mm.VmaAt(_va)!.KsmDomain, Is.Zero, "no refused call changed the domain");
        Assert.That(_p.SetDedupeDomain(_va, Page, 5), Is.EqualTo(Errno.None));
        Assert.That(_p.Mm.VmaAt(_va)!.KsmDomain, Is.EqualTo(5));
        AssertAuditClean();
    }

    [Test]
    public void Syscall_shaped_calls_report_overflowing_lengths_as_their_errno()
    {
        Assert.That(_p.Madvise(_va, ulong.MaxValue, Advice.DontNeed), Is.EqualTo(Errno.EINVAL));
        Assert.That(_p.Madvise(_va, ulong.MaxValue - _va - 10, Advice.DontNeed), Is.EqualTo(Errno.EINVAL));
        Assert.That(_p.Mprotect(_va, ulong.MaxValue, Protection.Read), Is.EqualTo(Errno.ENOMEM));
        Assert.That(_p.Munmap(_va, ulong.MaxValue), Is.EqualTo(Errno.EINVAL));
        Assert.That(_p.Mmap(0, ulong.MaxValue, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.ENOMEM));
        Assert.That(_p.Read<byte>(_va), Is.EqualTo(1));
        AssertAuditClean();
    }

    [Test]
    public void The_throwing_Mmap_refuses_a_zero_or_huge_length_as_an_argument_error()
    {
        var zero = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Mmap(0));
        Assert.That(zero!.ParamName, Is.EqualTo("length"));
        var huge = Assert.Throws<ArgumentOutOfRangeException>(() => _p.Mmap(ulong.MaxValue));
        Assert.That(huge!.ParamName, Is.EqualTo("length"));
        var flags = Assert.Throws<ArgumentException>(() => _p.Mmap(Page, Protection.ReadWrite, MapFlags.None));
        Assert.That(flags!.ParamName, Is.EqualTo("flags"));
        var fixedFlags = Assert.Throws<ArgumentException>(() => _p.Mmap(Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed));
        Assert.That(fixedFlags!.ParamName, Is.EqualTo("flags"));
        // No room: the only InsufficientMemoryException. Fill user space with one big reservation first.
        Assert.That(_p.Mmap(0, 0x7FF0_0000_0000, Protection.None, MapFlags.Private, out _), Is.EqualTo(Errno.None));
        Assert.Throws<InsufficientMemoryException>(() => _p.Mmap(1UL << 40));
        AssertAuditClean();
    }

    [Test]
    public void DedupeStore_and_VmmBuffer_refuse_bad_lengths_and_offsets_by_name()
    {
        using var store = new DedupeStore(_machine);
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => store.Allocate(-1))!.ParamName, Is.EqualTo("length"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => store.Allocate(0))!.ParamName, Is.EqualTo("length"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => store.Allocate(long.MaxValue))!.ParamName, Is.EqualTo("length"),
            "longer than user space can ever hold: not an out-of-memory condition");
        VmmBuffer buffer = store.Allocate(100);
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(-1, new byte[1]))!.ParamName, Is.EqualTo("offset"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(101, new byte[1]))!.ParamName, Is.EqualTo("offset"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(long.MaxValue, new byte[1]))!.ParamName, Is.EqualTo("offset"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(99, new byte[2]))!.ParamName, Is.EqualTo("source"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Read(-5, new byte[1]))!.ParamName, Is.EqualTo("offset"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Read(90, new byte[11]))!.ParamName, Is.EqualTo("destination"));
        buffer.Write(100, ReadOnlySpan<byte>.Empty); // an empty range at the end is fine
        VmmBuffer huge = store.Allocate(9L << 40); // address space only
        Assert.Throws<InvalidOperationException>(() => huge.Pin(), "more pages than one pin can hold, refused before pinning anything");
        huge.Dispose();
    }

    [Test]
    public void Ksm_step_calls_refuse_negative_counts_by_name()
    {
        Vmm.Ksm ksm = _machine.Ksm!;
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => ksm.ScanPages(-1))!.ParamName, Is.EqualTo("pages"));
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => ksm.RunFullScans(-1))!.ParamName, Is.EqualTo("count"));
    }
}
