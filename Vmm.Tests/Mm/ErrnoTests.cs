using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>Linux's errno rules for mmap, munmap, mprotect and madvise, and that a refused call changes nothing.</summary>
[TestFixture]
[Category("Smoke")]
public sealed class ErrnoTests
{
    private Machine _machine = null!;
    private VmProcess _p = null!;
    private ulong _va;

    [SetUp]
    public void SetUp()
    {
        (_machine, _p, _va, _) = TestMachines.CreateWithRegion(4 * 4096, fill: 1);
    }

    [TearDown]
    public void TearDown()
    {
        Assert.That(_machine.Audit(), Is.Empty, "a refused call leaves everything consistent");
        _machine.Dispose();
    }

    [Test]
    public void Mmap_rejects_bad_arguments()
    {
        Assert.That(_p.Mmap(0, 0, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.EINVAL), "zero length");
        Assert.That(_p.Mmap(0, 4096, Protection.ReadWrite, MapFlags.None, out _), Is.EqualTo(Errno.EINVAL), "neither private nor shared");
        Assert.That(_p.Mmap(0, 4096, Protection.ReadWrite, MapFlags.SharedValidate | (MapFlags)0x4000_0000, out _), Is.EqualTo(Errno.EOPNOTSUPP), "unknown flags with MAP_SHARED_VALIDATE");
        Assert.That(_p.Mmap(0x1_0000_0001, 4096, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.EINVAL), "misaligned fixed address");
        Assert.That(_p.Mmap(0x1000, 4096, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.EPERM), "fixed below mmap_min_addr");
        Assert.That(_p.Mmap(0, ulong.MaxValue - 100, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.ENOMEM), "length overflows when rounded up");
        Assert.That(_p.Mmap(0, 1UL << 50, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.ENOMEM), "larger than user space");
        Assert.That(_p.Mmap(0x7FFF_FFFF_0000, 1UL << 20, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out _), Is.EqualTo(Errno.ENOMEM), "fixed range beyond TASK_SIZE");
        Assert.That(_p.Mmap(_va, 4096, Protection.ReadWrite, MapFlags.Private | MapFlags.FixedNoReplace, out _), Is.EqualTo(Errno.EEXIST), "FIXED_NOREPLACE over a mapping");
        Assert.That(_p.Read<byte>(_va), Is.EqualTo(1), "the mapping survived");
    }

    [Test]
    public void Mmap_accepts_what_Linux_accepts()
    {
        Assert.That(_p.Mmap(0, 4096, Protection.ReadWrite, MapFlags.Private | (MapFlags)0x4000_0000, out _), Is.EqualTo(Errno.None), "unknown flags are ignored without SHARED_VALIDATE");
        Assert.That(_p.Mmap(0, 4096, Protection.ReadWrite, MapFlags.SharedValidate, out ulong shared), Is.EqualTo(Errno.None), "MAP_SHARED_VALIDATE maps shared");
        Assert.That(_p.Mm.VmaAt(shared)!.IsShared, Is.True);
        Assert.That(_p.Mmap(0x3000_0123, 4096, Protection.ReadWrite, MapFlags.Private, out ulong hinted), Is.EqualTo(Errno.None));
        Assert.That(hinted, Is.EqualTo(0x3000_1000UL), "an unaligned hint is rounded up to a page");
        Assert.That(_p.Mprotect(_va, 0, (Protection)0x80), Is.EqualTo(Errno.None), "an empty mprotect succeeds before the bits are looked at");
        Assert.That(_p.Madvise(shared, 4096, Advice.Mergeable), Is.EqualTo(Errno.None));
        Assert.That(_p.Mm.VmaAt(shared)!.Flags.HasFlag(VmaFlags.Mergeable), Is.False, "shared mappings are accepted but never marked mergeable");
    }

    [Test]
    public void Mmap_fixed_replaces_what_was_there()
    {
        Assert.That(_p.Mmap(_va + 4096, 4096, Protection.ReadWrite, MapFlags.Private | MapFlags.Fixed, out ulong mapped), Is.EqualTo(Errno.None));
        Assert.That(mapped, Is.EqualTo(_va + 4096));
        Assert.That(_p.Read<byte>(_va + 4096), Is.Zero, "a fresh mapping reads zero");
        Assert.That(_p.Read<byte>(_va), Is.EqualTo(1));
    }

    [Test]
    public void Munmap_rejects_bad_arguments_and_accepts_holes()
    {
        Assert.That(_p.Munmap(_va + 1, 4096), Is.EqualTo(Errno.EINVAL), "misaligned start");
        Assert.That(_p.Munmap(_va, 0), Is.EqualTo(Errno.EINVAL), "zero length");
        Assert.That(_p.Munmap(_va, ulong.MaxValue - 10), Is.EqualTo(Errno.EINVAL), "overflowing length");
        Assert.That(_p.Munmap(0x7FFF_FFFF_F000, 8192), Is.EqualTo(Errno.EINVAL), "beyond user space");
        Assert.That(_p.Munmap(0x2000_0000, 4096), Is.EqualTo(Errno.None), "nothing mapped there is fine");
        Assert.That(_p.Read<byte>(_va), Is.EqualTo(1));
    }

    [Test]
    public void Mprotect_rejects_bad_arguments_and_reports_holes()
    {
        Assert.That(_p.Mprotect(_va + 1, 4096, Protection.Read), Is.EqualTo(Errno.EINVAL), "misaligned start");
        Assert.That(_p.Mprotect(_va, 4096, (Protection)0x80), Is.EqualTo(Errno.EINVAL), "unknown bits");
        Assert.That(_p.Mprotect(_va, 0, Protection.Read), Is.EqualTo(Errno.None), "zero length is a no-op");
        Assert.That(_p.Mprotect(_va, ulong.MaxValue - 10, Protection.Read), Is.EqualTo(Errno.ENOMEM), "overflowing length");
        Assert.That(_p.Mprotect(0x2000_0000, 4096, Protection.Read), Is.EqualTo(Errno.ENOMEM), "unmapped");
        Assert.That(_p.Mprotect(_va + 2 * 4096, 4 * 4096, Protection.Read), Is.EqualTo(Errno.ENOMEM), "runs past the end");
        Assert.Throws<SegmentationFault>(() => _p.Write<byte>(_va + 3 * 4096, 2), "the mapped part before the hole was changed, as in Linux");
        _p.Write<byte>(_va, 2);
    }

    [Test]
    public void Madvise_rejects_bad_arguments_and_reports_holes_after_advising_the_rest()
    {
        Assert.That(_p.Madvise(_va + 1, 4096, Advice.DontNeed), Is.EqualTo(Errno.EINVAL), "misaligned start");
        Assert.That(_p.Madvise(_va, 4096, (Advice)99), Is.EqualTo(Errno.EINVAL), "unknown advice");
        Assert.That(_p.Madvise(_va, ulong.MaxValue - 10, Advice.DontNeed), Is.EqualTo(Errno.EINVAL), "overflowing length");
        Assert.That(_p.Madvise(_va, 0, Advice.DontNeed), Is.EqualTo(Errno.None), "zero length");
        Assert.That(_p.Madvise(_va + 3 * 4096, 2 * 4096, Advice.DontNeed), Is.EqualTo(Errno.ENOMEM), "part of the range is unmapped");
        Assert.That(_p.Read<byte>(_va + 3 * 4096), Is.Zero, "the mapped part was still advised");
        Assert.That(_p.Madvise(_va, 4 * 4096, Advice.Mergeable), Is.EqualTo(Errno.None));
        Assert.That(_p.Mm.VmaAt(_va)!.Flags.HasFlag(VmaFlags.Mergeable), Is.True, "MERGEABLE sets VM_MERGEABLE");
        Assert.That(_p.Madvise(_va + 4096, 4096, Advice.Unmergeable), Is.EqualTo(Errno.None));
        Assert.That(_p.Mm.VmaAt(_va + 4096)!.Flags.HasFlag(VmaFlags.Mergeable), Is.False, "UNMERGEABLE clears it on its range only");
        Assert.That(_p.Mm.VmaAt(_va + 2 * 4096)!.Flags.HasFlag(VmaFlags.Mergeable), Is.True);
        Assert.That(_p.Madvise(_va, 4 * 4096, Advice.WillNeed), Is.EqualTo(Errno.None));
        Assert.That(_p.Madvise(_va + 3 * 4096, 2 * 4096, Advice.WillNeed), Is.EqualTo(Errno.ENOMEM), "WILLNEED reports holes too");
    }

    [Test]
    public void Accesses_to_unmapped_memory_fault_with_the_address_and_kind()
    {
        var read = Assert.Throws<SegmentationFault>(() => _p.Read<long>(0x10));
        Assert.That((read!.Address, read.Kind, read.Reason), Is.EqualTo((0x10UL, AccessKind.Read, SegvReason.MapError)));
        var write = Assert.Throws<SegmentationFault>(() => _p.Write(_va + 4 * 4096 - 2, new byte[4]));
        Assert.That((write!.Address, write.Kind), Is.EqualTo((_va + 4 * 4096, AccessKind.Write)), "the first byte past the mapping");
        _p.Exit();
        var exited = Assert.Throws<InvalidOperationException>(() => _p.Read<byte>(_va), "a dead process cannot be read: API misuse, not a fault");
        Assert.That(exited!.Message, Does.Contain("has exited"));
        Assert.That(_p.Mmap(0, 4096, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.ENOMEM), "an exited process maps nothing");
        Assert.Throws<InvalidOperationException>(() => _p.Fork());
    }
}
