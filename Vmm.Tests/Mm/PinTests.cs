using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// Pinning (Mm/AddressSpace.Pin.cs, PinnedMemory): a pinned page is never moved and shares the process's
/// writes, fork copies it, a read pin unshares it, a pin that faults pins nothing.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class PinTests
{
    [Test]
    public void A_pinned_PROT_NONE_page_copied_at_fork_stays_PROT_NONE_in_the_child()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Write<int>(va, 0x2222);
        using PinnedMemory pin = p.Pin(va, 4096, write: true);
        Assert.That(p.Mprotect(va, 4096, Protection.None), Is.EqualTo(Errno.None));
        VmProcess child = p.Fork();
        Assert.Throws<SegmentationFault>(() => child.Read<int>(va));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_pinned_page_is_never_moved_and_sees_the_process_writes()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(3 * 4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        using (PinnedMemory pin = p.Pin(va + 100, 5000, write: true))
        {
            Assert.That(pin.PageCount, Is.EqualTo(2));
            Assert.That(pin.GetSpan(0).Length, Is.EqualTo(4096 - 100));
            Assert.That(pin.GetSpan(1).Length, Is.EqualTo(5000 - (4096 - 100)));
            pin.GetSpan(0)[0] = 0x77;
            Assert.That(p.Read<byte>(va + 100), Is.EqualTo(0x77), "the host writes through the pin");
            p.Write<byte>(va + 101, 0x78);
            Assert.That(pin.GetSpan(0)[1], Is.EqualTo(0x78), "and sees the process's writes");
            Assert.That(p.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.EBUSY), "a pinned page is never migrated");
            Assert.That(p.GetPagemap(va).Pinned, Is.EqualTo(1));
            Assert.That(machine.Audit(), Is.Empty, "Audit explains the pin's reference");

            VmProcess child = p.Fork();
            p.Write<byte>(va + 102, 0x79);
            Assert.That(pin.GetSpan(0)[2], Is.EqualTo(0x79), "after fork the parent still writes the pinned frame");
            Assert.That(child.Read<byte>(va + 102), Is.Zero, "the child got its own copy at fork");
            Assert.That(child.Read<byte>(va + 100), Is.EqualTo(0x77));
            child.Exit();
        }
        Assert.That(p.GetPagemap(va).Pinned, Is.Zero);
        Assert.That(p.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.None), "unpinned, it can move again");
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_read_pin_unshares_a_page_shared_by_fork()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        p.Write<int>(va, 3);
        VmProcess child = p.Fork();
        using PinnedMemory pin = p.Pin(va, 4, write: false);
        Assert.That(p.GetPagemap(va).Pfn, Is.Not.EqualTo(child.GetPagemap(va).Pfn), "the pin made the page the parent's own");
        Assert.That(p.GetPagemap(va).Writable, Is.False, "still read-only");
        p.Write<int>(va, 4);
        Assert.That(BitConverter.ToInt32(pin.GetReadOnlySpan(0)), Is.EqualTo(4), "a later write goes to the pinned frame");
        Assert.That(child.Read<int>(va), Is.EqualTo(3));
        Assert.Throws<InvalidOperationException>(() => pin.GetSpan(0));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Pinning_an_unmapped_range_faults_and_pins_nothing()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(2 * 4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
        var fault = Assert.Throws<SegmentationFault>(() => p.Pin(va, 3 * 4096, write: true));
        Assert.That(fault!.Address, Is.EqualTo(va + 2 * 4096));
        Assert.That(p.GetPagemap(va).Pinned, Is.Zero, "the pages pinned before the fault were released");
        Assert.That(machine.Audit(), Is.Empty);
    }
}
