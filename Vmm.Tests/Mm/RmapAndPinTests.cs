using Vmm.Migration;
using Vmm.Mm;

namespace Vmm.Tests.Mm;

[TestFixture]
[Category("Smoke")]
public sealed class RmapAndPinTests
{
    private static Machine NewMachine() => new(new MachineOptions { NodeCount = 2, NodeSizeBytes = 16L << 20, BlockSizeBytes = 8L << 20, MinFreeKbytes = 0 });

    [Test]
    public void The_reverse_map_finds_every_process_that_maps_a_page_shared_by_fork()
    {
        using Machine machine = NewMachine();
        VmProcess a = machine.CreateProcess();
        ulong va = a.Mmap(4 * 4096);
        a.Write<int>(va + 8192, 42);
        VmProcess b = a.Fork();
        VmProcess c = b.Fork();
        long pfn = a.GetPagemap(va + 8192).Pfn;
        Assert.That(c.GetPagemap(va + 8192).Pfn, Is.EqualTo(pfn));
        Assert.That(a.GetPagemap(va + 8192).MapCount, Is.EqualTo(3));

        var found = new List<(long Mm, ulong Address)>();
        machine.PageLock.Lock(pfn);
        machine.Rmap.Walk(pfn, new Vmm.Rmap.RmapWalkControl { RmapOne = (_, vma, address) => { found.Add((vma.Mm.Id, address)); return true; } });
        machine.PageLock.Unlock(pfn);
        Assert.That(found.Select(f => f.Address), Is.All.EqualTo(va + 8192), "each VMA yields the page's address");
        Assert.That(found.Select(f => f.Mm), Is.EquivalentTo(new[] { a.Mm.Id, b.Mm.Id, c.Mm.Id }), "and every process that maps it");

        var stopped = new List<long>();
        machine.Rmap.Walk(pfn, new Vmm.Rmap.RmapWalkControl { RmapOne = (_, vma, _) => { stopped.Add(vma.Mm.Id); return false; } });
        Assert.That(stopped, Has.Count.EqualTo(1), "rmap_one returning false stops the walk");
        var skipped = new List<long>();
        machine.Rmap.Walk(pfn, new Vmm.Rmap.RmapWalkControl
        {
            RmapOne = (_, vma, _) => { skipped.Add(vma.Mm.Id); return true; },
            InvalidVma = vma => vma.Mm == b.Mm,
        });
        Assert.That(skipped, Is.EquivalentTo(new[] { a.Mm.Id, c.Mm.Id }), "invalid_vma skips a VMA");
    }

    [Test]
    public void TryToUnmap_replaces_every_mapping_and_reports_the_ones_it_had_to_leave()
    {
        using Machine machine = NewMachine();
        VmProcess a = machine.CreateProcess();
        ulong va = a.Mmap(4096);
        a.Write<int>(va, 9);
        VmProcess b = a.Fork();
        long pfn = a.GetPagemap(va).Pfn;
        machine.MemMap.GetPage(pfn);
        machine.PageLock.Lock(pfn);
        static Pte Migration(Pte pte) => Pte.SwapEntry(Pte.MigrationReadType, pte.Pfn);
        bool all = machine.Rmap.TryToUnmap(pfn, Migration, vma => vma.Mm == b.Mm);
        Assert.That(all, Is.False, "b's mapping was excluded, so one mapping is left");
        Assert.That(machine.MemMap.MapCount(pfn), Is.EqualTo(1));
        Assert.That(a.GetPagemap(va).Swapped, Is.True, "a's PTE is now a migration entry");
        Assert.That(b.GetPagemap(va).Pfn, Is.EqualTo(pfn));
        Assert.That(machine.Rmap.TryToUnmap(pfn, Migration, null), Is.True);
        Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "only our reference is left");
        machine.Rmap.RemoveMigrationPtes(pfn, pfn);
        machine.PageLock.Unlock(pfn);
        machine.PutPage(pfn);
        Assert.That(a.Read<int>(va), Is.EqualTo(9));
        Assert.That(b.Read<int>(va), Is.EqualTo(9));
        Assert.That(machine.Audit(), Is.Empty, "the mappings are back, counted as before");
    }

    [Test]
    public void PageReferenced_counts_and_clears_accessed_bits()
    {
        using Machine machine = NewMachine();
        VmProcess a = machine.CreateProcess();
        ulong va = a.Mmap(4096);
        a.Write<int>(va, 1);
        VmProcess b = a.Fork();
        long pfn = a.GetPagemap(va).Pfn;
        _ = a.Read<int>(va + 4); // a TLB hit or a walk: the fill set the accessed bit
        machine.PageLock.Lock(pfn);
        int first = machine.Rmap.PageReferenced(pfn);
        int second = machine.Rmap.PageReferenced(pfn);
        machine.PageLock.Unlock(pfn);
        Assert.That(first, Is.EqualTo(1), "the parent's PTE was accessed; fork leaves the child's clear");
        Assert.That(second, Is.Zero, "the first call cleared it");
        b.Exit();
    }

    [Test]
    public void A_page_shared_by_three_processes_moves_to_another_node_and_stays_shared()
    {
        using Machine machine = NewMachine();
        VmProcess a = machine.CreateProcess(homeNode: 0);
        ulong va = a.Mmap(2 * 4096);
        a.Fill(va, 8192, 0x5C);
        VmProcess b = a.Fork();
        VmProcess c = a.Fork();
        long pfn = a.GetPagemap(va).Pfn;
        Assert.That(machine.Topology.NodeOf(pfn), Is.Zero);
        machine.MemMap.GetPage(pfn);
        Errno result = PageMigrator.MovePage(machine, pfn, targetNode: 1);
        machine.PutPage(pfn);
        Assert.That(result, Is.EqualTo(Errno.None));
        long moved = a.GetPagemap(va).Pfn;
        Assert.That(moved, Is.Not.EqualTo(pfn));
        Assert.That(machine.Topology.NodeOf(moved), Is.EqualTo(1));
        Assert.That(new[] { b.GetPagemap(va).Pfn, c.GetPagemap(va).Pfn }, Is.All.EqualTo(moved), "every mapping follows the page");
        Assert.That(b.Read<byte>(va + 100), Is.EqualTo(0x5C));
        c.Write<byte>(va, 1); // copy-on-write still works on the moved page
        Assert.That(a.Read<byte>(va), Is.EqualTo(0x5C));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_shared_anonymous_page_moves_with_its_page_cache_entry()
    {
        using Machine machine = NewMachine();
        VmProcess a = machine.CreateProcess();
        Assert.That(a.Mmap(0, 4096, Protection.ReadWrite, MapFlags.Shared, out ulong va), Is.EqualTo(Errno.None));
        a.Write<int>(va, 5);
        VmProcess b = a.Fork();
        Assert.That(a.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.None));
        Assert.That(machine.Topology.NodeOf(b.GetPagemap(va).Pfn), Is.EqualTo(1));
        b.Write<int>(va, 6);
        Assert.That(a.Read<int>(va), Is.EqualTo(6), "still one shared page");
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_PROT_NONE_page_stays_inaccessible_after_it_moves()
    {
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(4096);
        p.Write<int>(va, 0x1111);
        Assert.That(p.Mprotect(va, 4096, Protection.None), Is.EqualTo(Errno.None));
        Assert.That(p.Mm.TryReplacePage(va, 1), Is.EqualTo(Errno.None));
        Assert.Throws<SegmentationFault>(() => p.Read<int>(va), "the restored PTE takes its protection from the VMA");
        Assert.That(machine.Audit(), Is.Empty);
        Assert.That(p.Mprotect(va, 4096, Protection.Read), Is.EqualTo(Errno.None));
        Assert.That(p.Read<int>(va), Is.EqualTo(0x1111));
    }

    [Test]
    public void A_fork_while_a_page_is_under_migration_leaves_it_shared_copy_on_write()
    {
        using Machine machine = NewMachine();
        VmProcess parent = machine.CreateProcess();
        ulong va = parent.Mmap(4096);
        parent.Write<int>(va, 0x11);
        long pfn = parent.GetPagemap(va).Pfn;
        Assert.That(parent.GetPagemap(va).Exclusive, Is.True);

        // The migrator's steps, with a fork between the freeze and the commit.
        machine.MemMap.GetPage(pfn);
        machine.PageLock.Lock(pfn);
        Assert.That(machine.Rmap.TryToMigrate(pfn), Is.True);
        VmProcess child = parent.Fork();
        Assert.That(child.GetPagemap(va).Swapped, Is.True, "the child copied the migration entry");
        long newPfn = machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoZero, 1);
        PageMigrator.CopyPage(machine, pfn, newPfn);
        machine.Rmap.RemoveMigrationPtes(pfn, newPfn);
        machine.PutPage(newPfn);
        machine.PageLock.Unlock(pfn);
        machine.PutPage(pfn);
        Assert.That(child.GetPagemap(va).Pfn, Is.EqualTo(newPfn), "both processes map the new frame");

        Assert.That(parent.GetPagemap(va).MapCount, Is.EqualTo(2));
        Assert.That(parent.GetPagemap(va).Exclusive, Is.False, "fork turned the exclusive entry into a shared one");
        parent.Write<int>(va, 0x22);
        Assert.That(child.Read<int>(va), Is.EqualTo(0x11), "copy-on-write keeps the child's view");
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_pinned_PROT_NONE_page_copied_at_fork_stays_PROT_NONE_in_the_child()
    {
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(4096);
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
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(3 * 4096);
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
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(4096);
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
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * 4096);
        var fault = Assert.Throws<SegmentationFault>(() => p.Pin(va, 3 * 4096, write: true));
        Assert.That(fault!.Address, Is.EqualTo(va + 2 * 4096));
        Assert.That(p.GetPagemap(va).Pinned, Is.Zero, "the pages pinned before the fault were released");
        Assert.That(machine.Audit(), Is.Empty);
    }
}
