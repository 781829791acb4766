using Vmm.Memory;

namespace Vmm.Tests.Memory;

/// <summary>
/// The allocator against a model: random allocations, frees, isolations and drains, checking after
/// every step that no frame is handed out twice, that isolated pageblocks hand out nothing, that every
/// frame arrives zeroed and keeps its owner's bytes, and that the counters add up exactly.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class AllocatorModelTests
{
    private sealed record Block(long Pfn, int Order, byte Stamp, bool Compound);

    [TestCase(1)]
    [TestCase(2)]
    [TestCase(3)]
    public void Random_sequences_match_the_model(int seed)
    {
        var random = new Random(TestEnvironment.Seed(seed));
        var options = new MachineOptions { NodeCount = 2, NodeSizeBytes = 8L << 20, BlockSizeBytes = 4L << 20, MinFreeKbytes = 0 };
        using var machine = TestMachines.Create(options);
        PageAllocator allocator = machine.Allocator;
        long total = machine.Topology.TotalFrames;
        var owner = new Block?[total];
        var live = new List<Block>();
        var isolated = new HashSet<long>(); // pageblock indexes
        int[] initialBuddy = BuddyTotals(machine);
        int steps = 4000 * TestEnvironment.StressScale;

        for (int step = 0; step < steps; step++)
        {
            int action = random.Next(100);
            if (action < 50 || live.Count == 0)
            {
                int order = random.Next(10) < 8 ? 0 : random.Next(0, 10);
                AllocFlags flags = (random.Next(3) == 0 ? AllocFlags.None : AllocFlags.Movable)
                                   | (random.Next(4) == 0 ? AllocFlags.ThisNode : 0)
                                   | (order > 0 && random.Next(2) == 0 ? AllocFlags.Compound : 0);
                int node = random.Next(-1, 2);
                long pfn = allocator.AllocPages(order, flags, node);
                if (pfn == PageAllocator.NoPfn)
                    continue;
                Assert.That(pfn % (1L << order), Is.Zero, $"step {step}: blocks are naturally aligned");
                if ((flags & AllocFlags.ThisNode) != 0)
                    Assert.That(machine.Topology.NodeOf(pfn), Is.EqualTo(Math.Max(node, 0)), $"step {step}: ThisNode");
                if ((flags & AllocFlags.Movable) == 0)
                    Assert.That(allocator.ZoneTypeOf(pfn), Is.EqualTo(ZoneType.Normal), $"step {step}: unmovable never in ZONE_MOVABLE");
                var block = new Block(pfn, order, (byte)random.Next(1, 256), (flags & AllocFlags.Compound) != 0);
                for (long p = pfn; p < pfn + (1L << order); p++)
                {
                    Assert.That(owner[p], Is.Null, $"step {step}: frame {p} handed out twice");
                    Assert.That(isolated.Contains(p >> PageAllocator.PageblockOrder), Is.False, $"step {step}: frame {p} is in an isolated pageblock");
                    Assert.That(machine.GetFrameSpan(p).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), $"step {step}: frame {p} not zeroed");
                    machine.GetFrameSpan(p).Fill(block.Stamp);
                    owner[p] = block;
                }
                live.Add(block);
            }
            else if (action < 90)
            {
                int index = random.Next(live.Count);
                Block block = live[index];
                live[index] = live[^1];
                live.RemoveAt(live.Count - 1);
                for (long p = block.Pfn; p < block.Pfn + (1L << block.Order); p++)
                {
                    Assert.That(machine.GetFrameSpan(p).IndexOfAnyExcept(block.Stamp), Is.EqualTo(-1), $"step {step}: frame {p} was written by someone else");
                    owner[p] = null;
                }
                allocator.FreePages(block.Pfn, block.Order);
            }
            else if (action < 95)
            {
                // Isolate or release a random pageblock range of one or two pageblocks.
                long pageblocks = total >> PageAllocator.PageblockOrder;
                long first = random.NextInt64(pageblocks);
                long count = Math.Min(random.Next(1, 3), pageblocks - first);
                long start = first << PageAllocator.PageblockOrder, end = (first + count) << PageAllocator.PageblockOrder;
                if (Enumerable.Range(0, (int)count).All(i => isolated.Contains(first + i)))
                {
                    allocator.UndoIsolatePageRange(start, end);
                    for (long i = 0; i < count; i++)
                        isolated.Remove(first + i);
                }
                else
                {
                    Errno result = allocator.IsolatePageRange(start, end, out long bad);
                    bool anyIsolated = Enumerable.Range(0, (int)count).Any(i => isolated.Contains(first + i));
                    if (anyIsolated)
                    {
                        Assert.That(result, Is.EqualTo(Errno.EBUSY), $"step {step}: isolating an isolated pageblock");
                    }
                    else if (result == Errno.None)
                    {
                        for (long i = 0; i < count; i++)
                            isolated.Add(first + i);
                    }
                    else
                    {
                        Assert.That(result, Is.EqualTo(Errno.EBUSY));
                        Assert.That(bad, Is.InRange(start, end - 1), "EBUSY names the unmovable frame");
                        Assert.That(owner[bad], Is.Not.Null, "the named frame is in use");
                        Assert.That(allocator.ZoneTypeOf(bad), Is.EqualTo(ZoneType.Normal), "ZONE_MOVABLE never refuses isolation");
                    }
                }
            }
            else
            {
                allocator.DrainAllPages();
            }

            if (step % 50 == 0)
                CheckCounters(machine, owner, isolated, step);
        }

        foreach (Block block in live)
            allocator.FreePages(block.Pfn, block.Order);
        foreach (long pb in isolated)
        {
            long start = pb << PageAllocator.PageblockOrder;
            Assert.That(allocator.TestPagesIsolated(start, start + PageAllocator.PageblockFrames), Is.True,
                "with every frame freed, an isolated pageblock is wholly on the ISOLATE lists");
            allocator.UndoIsolatePageRange(start, start + PageAllocator.PageblockFrames);
        }
        allocator.DrainAllPages();
        Assert.That(BuddyTotals(machine), Is.EqualTo(initialBuddy), "every free block coalesced back into max-order blocks");
        Assert.That(machine.GetStats().MemFreeBytes, Is.EqualTo(machine.GetStats().MemTotalBytes));
    }

    private static void CheckCounters(Machine machine, Block?[] owner, HashSet<long> isolated, int step)
    {
        MachineStats stats = machine.GetStats();
        long inUse = owner.LongCount(b => b is not null);
        Assert.That(stats.AllFreePages + inUse, Is.EqualTo(machine.Topology.TotalFrames), $"step {step}: free + used = total");
        long buddyFree = stats.Nodes.SelectMany(n => n.Zones).Sum(z => z.BuddyInfo.Select((count, order) => count << order).Sum());
        Assert.That(buddyFree, Is.EqualTo(stats.Nodes.SelectMany(n => n.Zones).Sum(z => z.FreePages + z.IsolatedFreePages)),
            $"step {step}: buddyinfo agrees with the free counters");
        long isolatedFree = stats.Nodes.SelectMany(n => n.Zones).Sum(z => z.IsolatedFreePages);
        long isolatedFrames = isolated.Sum(pb => Enumerable.Range(0, PageAllocator.PageblockFrames)
            .LongCount(i => owner[(pb << PageAllocator.PageblockOrder) + i] is null));
        Assert.That(isolatedFree, Is.LessThanOrEqualTo(isolatedFrames), $"step {step}: isolated free frames lie in isolated pageblocks");
    }

    private static int[] BuddyTotals(Machine machine) =>
        [.. Enumerable.Range(0, PageAllocator.MaxOrder + 1)
            .Select(o => (int)machine.GetStats().Nodes.SelectMany(n => n.Zones).Sum(z => o < z.BuddyInfo.Count ? z.BuddyInfo[o] : 0))];
}
