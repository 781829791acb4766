using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Hotplug;

/// <summary>Hot-add into the reserved room, auto_online_blocks, and removal of offline blocks.</summary>
[Category("Smoke")]
[Category("Hotplug")]
public class HotAddTests
{
    private static MachineOptions WithRoom(int room = 2) =>
        TestMachines.TwoNodes with { BackgroundThreads = false, HotplugBlocksPerNode = room };

    [Test]
    public void The_hot_add_room_is_absent_at_boot_and_costs_no_memory()
    {
        using var machine = new Machine(WithRoom());
        Assert.That(machine.Topology.BlocksPerNode, Is.EqualTo(4), "2 blocks of memory + 2 of room per node");
        Assert.That(machine.Hotplug.Blocks.Select(b => b.Index), Is.EqualTo((int[])[0, 1, 4, 5]), "only present blocks are devices");
        Assert.Throws<ArgumentOutOfRangeException>(() => machine.Hotplug.GetBlock(2));
        long managed = machine.GetStats().Nodes.Sum(n => n.Zones.Sum(z => z.ManagedPages));
        Assert.That(managed, Is.EqualTo(2 * (16L << 20) / 4096), "the room is not memory");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Added_memory_is_offline_until_onlined_and_then_usable()
    {
        using var machine = new Machine(WithRoom());
        Assert.That(machine.Hotplug.AddMemory(0, out MemoryBlock? block), Is.EqualTo(Errno.None));
        Assert.That(block!.Index, Is.EqualTo(2));
        Assert.That(block.State, Is.EqualTo("offline"), "auto_online_blocks defaults to offline");
        Assert.That(block.ValidZones, Is.EqualTo("Movable"), "above the node's movable block: only ZONE_MOVABLE");
        Assert.That(block.Write("state", "online_kernel"), Is.EqualTo(Errno.EINVAL));
        Assert.That(block.Write("state", "online"), Is.EqualTo(Errno.None));
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));

        // Take node 0's other movable block away: the new block must hold what is written now.
        Assert.That(machine.Hotplug.GetBlock(1).Offline().Error, Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(1000 * 4096);
        byte[] data = WriteRandomPages(p, va, 1000, seed: 3);
        Assert.That(Enumerable.Range(0, 1000).Count(i => machine.Topology.BlockOf(p.GetPagemap(va + (ulong)i * 4096).Pfn) == 2), Is.GreaterThan(0));
        Assert.That(ReadPages(p, va, 1000), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Auto_online_brings_an_added_block_online_in_the_zone_it_names()
    {
        using var machine = new Machine(WithRoom());
        Assert.That(machine.Hotplug.WriteAutoOnlineBlocks("bogus"), Is.EqualTo(Errno.EINVAL));
        Assert.That(machine.Hotplug.AutoOnlineBlocks, Is.EqualTo("offline"));
        Assert.That(machine.Hotplug.WriteAutoOnlineBlocks("online_movable\n"), Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.AddMemory(1, out MemoryBlock? block), Is.EqualTo(Errno.None));
        Assert.That(block!.Node, Is.EqualTo(1));
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void The_room_runs_out_with_ENOSPC_and_removal_gives_it_back()
    {
        using var machine = new Machine(WithRoom(room: 1));
        Assert.That(machine.Hotplug.AddMemory(0, out MemoryBlock? block), Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.AddMemory(0, out MemoryBlock? none), Is.EqualTo(Errno.ENOSPC));
        Assert.That(none, Is.Null);
        Assert.That(block!.Online(), Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.RemoveMemory(block), Is.EqualTo(Errno.EBUSY), "only an offline block can be removed");
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.RemoveMemory(block), Is.EqualTo(Errno.None));
        Assert.That(block.State, Is.EqualTo("removed"));
        Assert.That(machine.Hotplug.RemoveMemory(block), Is.EqualTo(Errno.ENODEV));
        Assert.That(block.Online(), Is.EqualTo(Errno.ENODEV));
        Assert.That(machine.Hotplug.Blocks.Select(b => b.Index), Does.Not.Contain(block.Index));
        Assert.That(machine.Hotplug.AddMemory(0, out MemoryBlock? again), Is.EqualTo(Errno.None));
        Assert.That(again, Is.SameAs(block));
        Assert.That(machine.Hotplug.AddedCount, Is.EqualTo(2));
        Assert.That(machine.Hotplug.RemovedCount, Is.EqualTo(1));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_boot_block_can_be_removed_once_offline()
    {
        using var machine = new Machine(TestMachines.TwoNodes with { BackgroundThreads = false });
        MemoryBlock block = machine.Hotplug.GetBlock(3);
        Assert.That(block.Offline().Error, Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.RemoveMemory(block), Is.EqualTo(Errno.None));
        Assert.That(machine.Hotplug.Blocks, Has.Count.EqualTo(3));
        Assert.That(machine.Hotplug.AddMemory(1, out MemoryBlock? back), Is.EqualTo(Errno.None), "a removed block is room again");
        Assert.That(back!.Index, Is.EqualTo(3));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Room_that_would_overflow_the_pfn_space_is_refused()
    {
        var options = new MachineOptions { NodeCount = 1, NodeSizeBytes = 128L << 20, HotplugBlocksPerNode = int.MaxValue };
        Assert.Throws<ArgumentOutOfRangeException>(() => options.Validate());
        Assert.Throws<ArgumentOutOfRangeException>(() => (options with { HotplugBlocksPerNode = -1 }).Validate());
    }
}
