using Vmm.Memory;
using Vmm.Native;

namespace Vmm.Tests.Native;

[TestFixture]
[Category("Smoke")]
public sealed unsafe class ArenaTests
{
    [Test]
    public void Topology_maps_pfns_to_blocks_and_nodes()
    {
        var topology = new Topology(nodeCount: 2, blocksPerNode: 4, blockSizeBytes: 2L << 20);
        Assert.That(topology.FramesPerBlock, Is.EqualTo(512));
        Assert.That(topology.TotalFrames, Is.EqualTo(4096));
        Assert.That(topology.NodeOf(2047), Is.Zero);
        Assert.That(topology.NodeOf(2048), Is.EqualTo(1));
        Assert.That(topology.BlockOf(1023), Is.EqualTo(1));
        Assert.That(topology.BlockOf(1024), Is.EqualTo(2));
        Assert.That(topology.NodeOfBlock(5), Is.EqualTo(1));
        Assert.That(topology.FirstPfnOfBlock(5), Is.EqualTo(2560));
        Assert.That(topology.FirstPfnOfNode(1), Is.EqualTo(2048));
        Assert.That(topology.IsValidPfn(4096), Is.False);
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new Topology(1, 1, 3L << 20), "not a power of two");
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new Topology(0, 1, 2L << 20));
    }

    [Test]
    public void Frame_addresses_and_pfns_are_inverse()
    {
        using var arena = new Arena(new Topology(1, 2, 2L << 20));
        byte* frame = arena.FrameAddress(700);
        Assert.That(frame - arena.Base, Is.EqualTo(700L * 4096));
        Assert.That(arena.PfnOf(frame + 4095), Is.EqualTo(700));
        Assert.That(arena.PfnOf(arena.Base - 1), Is.EqualTo(-1));
        Assert.That(arena.PfnOf(arena.Base + (4L << 20)), Is.EqualTo(-1));
    }

    [Test]
    public void Decommit_returns_memory_to_the_host_and_the_frames_read_zero()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc");
        const long size = 64L << 20;
        using var arena = new Arena(new Topology(1, 1, size));
        long frames = size / 4096;
        for (long pfn = 0; pfn < frames; pfn++)
            new Span<byte>(arena.FrameAddress(pfn), 4096).Fill(0x5A);
        long touched = HostMemory.ReadRssBytes();
        arena.Decommit(0, frames);
        long after = HostMemory.ReadRssBytes();
        Assert.That(touched - after, Is.GreaterThan(size * 9 / 10), $"RSS {touched} -> {after}: the 64 MiB left the process");
        Assert.That(new Span<byte>(arena.FrameAddress(123), 4096).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "decommitted frames read zero");
        Assert.That(arena.Recommit(0, 16, populate: true), Is.True);
        Assert.Throws<ArgumentOutOfRangeException>(() => arena.Decommit(frames - 1, 2));
    }

    [Test]
    public void The_portable_arena_works_the_same_except_for_RSS()
    {
        using var machine = TestMachines.Create(TestMachines.Small with { ForcePortableArena = true });
        Assert.That(machine.Arena.ReturnsMemoryToHost, Is.False);
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        machine.GetFrameSpan(pfn).Fill(7);
        machine.Arena.Decommit(pfn, 1);
        Assert.That(machine.GetFrameSpan(pfn).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "decommit still zeroes");
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void ReleaseFreeMemory_gives_freed_frames_back_to_the_host()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc");
        using var machine = TestMachines.Create(new MachineOptions { NodeCount = 1, NodeSizeBytes = 64L << 20, BlockSizeBytes = 32L << 20, MinFreeKbytes = 0 });
        var pages = new List<long>();
        long pfn;
        while ((pfn = machine.Allocator.AllocPages(9, AllocFlags.Movable)) != PageAllocator.NoPfn)
        {
            pages.Add(pfn);
            for (long p = pfn; p < pfn + 512; p++)
                machine.GetFrameSpan(p).Fill(0xC3);
        }
        Assert.That(pages, Has.Count.EqualTo(32));
        foreach (long p in pages)
            machine.Allocator.FreePages(p, 9);
        long before = HostMemory.ReadRssBytes();
        long released = machine.Allocator.ReleaseFreeMemory();
        long after = HostMemory.ReadRssBytes();
        Assert.That(released, Is.EqualTo(64L << 20), "every free block was reported");
        Assert.That(before - after, Is.GreaterThan(56L << 20), $"RSS {before} -> {after}");
        Assert.That(machine.Allocator.ReleaseFreeMemory(), Is.Zero, "blocks already given back are skipped");
        Assert.That(machine.GetPageInfo(100).Flags.HasFlag(PageFlags.Zeroed), Is.True, "released frames are known zero");
        long again = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        Assert.That(machine.GetFrameSpan(again).IndexOfAnyExcept((byte)0), Is.EqualTo(-1));
        machine.Allocator.FreePages(again);
    }

    [Test]
    public void Dispose_releases_the_machine_and_later_calls_throw()
    {
        var machine = TestMachines.Create();
        machine.Dispose();
        machine.Dispose();
        Assert.Throws<ObjectDisposedException>(() => machine.GetStats());
        Assert.Throws<ObjectDisposedException>(() => machine.GetFrameSpan(0));
        Assert.Throws<ObjectDisposedException>(() => machine.Allocator.AllocPages());
        Assert.Throws<ObjectDisposedException>(() => machine.Allocator.FreePages(0));
    }
}
