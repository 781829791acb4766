using Vmm.Migration;
using Vmm.Mm;

namespace Vmm.Tests.Migration;

/// <summary>
/// Moving a page (Migration/PageMigrator.cs): every mapping follows it, shared and PROT_NONE pages keep
/// what they were, and a fork between the freeze and the commit leaves the page shared copy-on-write.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Migration")]
public sealed class PageMigratorTests
{
    [Test]
    public void A_page_shared_by_three_processes_moves_to_another_node_and_stays_shared()
    {
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
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
        using Machine machine = TestMachines.Create(TestMachines.TwoNodes);
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
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess p, ulong va, _) = region;
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
        using MachineWithRegion region = TestMachines.CreateWithRegion(4096, options: TestMachines.TwoNodes);
        (Machine machine, VmProcess parent, ulong va, _) = region;
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
        machine.PageLock.Lock(newPfn); // as the migrator does: both pages locked
        machine.Rmap.RemoveMigrationPtes(pfn, newPfn);
        machine.Lru.Add(newPfn); // as the migrator does: the new frame joins the LRU
        machine.PageLock.Unlock(newPfn);
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
}
