using Vmm.Memory;
using static Vmm.Tests.Migration.MigrationTestHelpers;

namespace Vmm.Tests.Hotplug;

/// <summary>Memory offline and online of one block: the sequence, the state file, errors, memory given back.</summary>
[Category("Smoke")]
[Category("Hotplug")]
public class MemoryOfflineTests
{
    /// <summary>The MOVABLE block of node 0 of <see cref="TestMachines.TwoNodes"/> (blocks 0-1 are node 0, the upper one movable).</summary>
    private const int MovableBlockOfNode0 = 1;

    private static (VmProcess Process, ulong Va, byte[] Data) FillMovableBlock(Machine machine, int pages, int seed = 1)
    {
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap((ulong)pages * 4096);
        byte[] data = WriteRandomPages(p, va, pages, seed);
        return (p, va, data);
    }

    private static int PagesIn(Machine machine, VmProcess p, ulong va, int pages, int block)
    {
        int n = 0;
        for (int i = 0; i < pages; i++)
            if (machine.Topology.BlockOf(p.GetPagemap(va + (ulong)i * 4096).Pfn) == block)
                n++;
        return n;
    }

    [Test]
    public void Offline_moves_every_page_out_and_the_contents_survive()
    {
        using var machine = new Machine(TestMachines.TwoNodes with { BackgroundThreads = false });
        (VmProcess p, ulong va, byte[] data) = FillMovableBlock(machine, 1000);
        int before = PagesIn(machine, p, va, 1000, MovableBlockOfNode0);
        Assert.That(before, Is.GreaterThan(0), "the test's pages start in the movable block");

        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.None), string.Join("; ", result.Blockers));
        Assert.That(result.PagesMoved, Is.EqualTo(before), "every page that was in the block moved");
        Assert.That(block.State, Is.EqualTo("offline"));
        Assert.That(block.Zone, Is.Null);
        Assert.That(PagesIn(machine, p, va, 1000, MovableBlockOfNode0), Is.Zero);
        Assert.That(ReadPages(p, va, 1000), Is.EqualTo(data), "contents intact");
        Assert.That(machine.GetMemoryBlock(MovableBlockOfNode0).FreeFrames, Is.Zero, "an offline block has no free frames");
        Assert.That(machine.GetPageInfo(block.StartPfn).Flags, Is.EqualTo(PageFlags.Offline));
        Assert.That(machine.GetMigrationStats().SucceededByReason[MigrateReason.MemoryHotplug], Is.EqualTo(before));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Offline_then_online_gives_the_memory_back_to_the_zone()
    {
        using var machine = new Machine(TestMachines.TwoNodes with { BackgroundThreads = false });
        long managedBefore = machine.GetStats().Nodes[0].Zones.Sum(z => z.ManagedPages);
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        Assert.That(block.Write("state", "offline"), Is.EqualTo(Errno.None));
        long managedOffline = machine.GetStats().Nodes[0].Zones.Sum(z => z.ManagedPages);
        Assert.That(managedOffline, Is.EqualTo(managedBefore - block.Frames));
        TestMachines.AssertAuditClean(machine);

        Assert.That(block.Write("state", "online_movable\n"), Is.EqualTo(Errno.None));
        Assert.That(block.State, Is.EqualTo("online"));
        Assert.That(block.Zone, Is.EqualTo(ZoneType.Movable));
        Assert.That(machine.GetStats().Nodes[0].Zones.Sum(z => z.ManagedPages), Is.EqualTo(managedBefore));
        // The memory is usable again: fill it.
        (VmProcess p, ulong va, byte[] data) = FillMovableBlock(machine, 1500, seed: 2);
        Assert.That(ReadPages(p, va, 1500), Is.EqualTo(data));
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void State_writes_follow_linux_errors()
    {
        using var machine = new Machine(TestMachines.TwoNodes with { BackgroundThreads = false });
        MemoryBlock block = machine.Hotplug.GetBlock(MovableBlockOfNode0);
        Assert.That(block.Write("state", "bogus"), Is.EqualTo(Errno.EINVAL), "a bad string");
        Assert.That(block.Write("state", "online"), Is.EqualTo(Errno.EINVAL), "already online");
        Assert.That(block.Write("valid_zones", "Normal"), Is.EqualTo(Errno.EACCES), "read-only attribute");
        Assert.That(block.Write("nonexistent", "x"), Is.EqualTo(Errno.ENOENT));
        Assert.That(block.Write("state", "offline"), Is.EqualTo(Errno.None));
        Assert.That(block.Write("state", "offline"), Is.EqualTo(Errno.EINVAL), "already offline");
        Assert.That(block.TryRead("valid_zones", out string zones), Is.EqualTo(Errno.None));
        Assert.That(zones, Is.EqualTo("Movable Normal"), "last zone first; normal allowed: no movable block below it");
        Assert.That(block.TryRead("phys_index", out string index), Is.EqualTo(Errno.None));
        Assert.That(index, Is.EqualTo("00000001"));
        Assert.That(block.TryRead("state", out string state), Is.EqualTo(Errno.None));
        Assert.That(state, Is.EqualTo("offline"));

        // Block 0 (NORMAL) below: offline it too, then it may not be onlined movable while block 1... is offline: both zones allowed.
        MemoryBlock normal = machine.Hotplug.GetBlock(0);
        Assert.That(normal.ValidZones, Is.EqualTo("Normal"));
        Assert.That(block.Write("state", "online_movable"), Is.EqualTo(Errno.None));
        Assert.That(block.Write("state", "offline"), Is.EqualTo(Errno.None));
        Assert.That(block.Write("state", "online_kernel"), Is.EqualTo(Errno.None), "no movable block below it");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_kernel_block_below_a_movable_one_cannot_come_online_movable_above_kernel_memory()
    {
        using var machine = new Machine(TestMachines.TwoNodes with { BackgroundThreads = false, MovableBlocksPerNode = 0 });
        MemoryBlock low = machine.Hotplug.GetBlock(0);
        Assert.That(low.Write("state", "offline"), Is.EqualTo(Errno.None));
        Assert.That(low.ValidZones, Is.EqualTo("Normal"), "block 1 above it is online in ZONE_NORMAL");
        Assert.That(low.Write("state", "online_movable"), Is.EqualTo(Errno.EINVAL));
        Assert.That(low.Write("state", "online"), Is.EqualTo(Errno.None));
        Assert.That(low.Zone, Is.EqualTo(ZoneType.Normal));
    }
}
