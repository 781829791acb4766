using Vmm.Mm;

namespace Vmm.Tests.Rmap;

/// <summary>
/// The reverse map (Rmap/RmapWalker.cs): a walk finds every mapping of a page and honours rmap_one and
/// invalid_vma, try_to_unmap leaves the mappings it was told to skip, page_referenced clears accessed bits.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class RmapWalkerTests
{
    [Test]
    public void The_reverse_map_finds_every_process_that_maps_a_page_shared_by_fork()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4 * 4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess a, ulong va, _) = region;
        a.Write<int>(va + 8192, 42);
        VmProcess b = a.Fork();
        VmProcess c = b.Fork();
        long pfn = a.GetPagemap(va + 8192).Pfn;
        Assert.That(c.GetPagemap(va + 8192).Pfn, Is.EqualTo(pfn));
        Assert.That(a.GetPagemap(va + 8192).MapCount, Is.EqualTo(3));

        var found = new List<(long Mm, ulong Address)>();
        machine.PageLock.Lock(pfn); // rmap_walk's precondition, for every walk below
        machine.Rmap.Walk(pfn, new Vmm.Rmap.RmapWalkControl { RmapOne = (_, vma, address) => { found.Add((vma.Mm.Id, address)); return true; } });
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
        machine.PageLock.Unlock(pfn);
        Assert.That(skipped, Is.EquivalentTo(new[] { a.Mm.Id, c.Mm.Id }), "invalid_vma skips a VMA");
    }

    [Test]
    public void TryToUnmap_replaces_every_mapping_and_reports_the_ones_it_had_to_leave()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess a, ulong va, _) = region;
        a.Write<int>(va, 9);
        machine.Lru.DrainAll(); // the add batch's reference would be counted below
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
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess a, ulong va, _) = region;
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
}
