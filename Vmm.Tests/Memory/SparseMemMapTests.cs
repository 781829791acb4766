using Vmm.Memory;
using Vmm.Native;

namespace Vmm.Tests.Memory;

/// <summary>
/// The sparse memmap with deferred init: descriptors are reserved for the whole arena and initialised a
/// section (one max-order block) at a time when the allocator first needs its frames.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class SparseMemMapTests
{
    private static long[] InitialisedSections(Machine machine) =>
        [.. Enumerable.Range(0, (int)machine.MemMap.SectionCount).Where(s => machine.MemMap.IsSectionInitialised(s)).Select(s => (long)s)];

    [Test]
    public void A_one_TiB_machine_costs_the_host_a_few_MiB_and_then_what_it_touches()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc, and the memmap is sparse only where mmap(MAP_NORESERVE) exists");
        using (var warm = TestMachines.Create())
        {
            VmProcess p = warm.CreateProcess();
            p.Write<long>(p.Mmap(1 << 20), 1);
            Assert.That(warm.Audit(), Is.Empty);
        }
        GC.Collect();
        long before = HostMemory.ReadRssBytes();
        var options = new MachineOptions { NodeCount = 2, NodeSizeBytes = 512L << 30 };
        Machine machine;
        try
        {
            machine = TestMachines.Create(options);
        }
        catch (ArgumentException e) when (e.InnerException is ArenaException)
        {
            Assert.Ignore($"this host will not reserve 1 TiB of address space: {e.Message}");
            return;
        }
        using (machine)
        {
            GC.Collect();
            long built = HostMemory.ReadRssBytes();
            MachineStats stats = machine.GetStats();
            Assert.That(stats.MemTotalBytes, Is.EqualTo(1L << 40));
            Assert.That(stats.MemFreeBytes, Is.EqualTo(1L << 40), "never-initialised memory is free memory");
            Assert.That(stats.DescriptorBytes, Is.Zero, "no descriptor is committed before memory is used");
            Assert.That(built - before, Is.LessThan(16L << 20),
                $"RSS {before >> 20} -> {built >> 20} MiB: a dense memmap would have committed {(machine.Topology.TotalFrames * 64) >> 30} GiB");

            VmProcess process = machine.CreateProcess(homeNode: 1);
            const ulong length = 16 << 20;
            ulong va = process.Mmap(length);
            for (ulong offset = 0; offset < length; offset += 4096)
                process.Write(va + offset, offset);
            for (ulong offset = 0; offset < length; offset += 4096 * 97)
                Assert.That(process.Read<ulong>(va + offset), Is.EqualTo(offset));
            Assert.That(machine.GetPageInfo(process.GetPagemap(va).Pfn).Node, Is.EqualTo(1));
            GC.Collect();
            long touched = HostMemory.ReadRssBytes();
            long descriptors = machine.GetStats().DescriptorBytes;
            TestContext.Out.WriteLine($"RSS before {before >> 10} KiB, built {built >> 10} KiB, touched {touched >> 10} KiB; descriptors {descriptors >> 10} KiB");
            Assert.That(descriptors, Is.LessThanOrEqualTo(1L << 20), "16 MiB of memory needs a handful of 64 KiB sections of descriptors");
            Assert.That(touched - before, Is.LessThan((long)length + (32L << 20)),
                $"RSS {before >> 20} -> {touched >> 20} MiB after touching {length >> 20} MiB");
            Assert.That(machine.Audit(), Is.Empty, "the audit walks a 1 TiB memmap without initialising it");
            Assert.That(machine.GetStats().DescriptorBytes, Is.EqualTo(descriptors), "auditing committed nothing");
            process.Exit();
            Assert.That(machine.Audit(), Is.Empty);
        }
    }

    [Test]
    public void Touching_memory_on_one_node_initialises_only_that_nodes_top_sections()
    {
        using var machine = TestMachines.Create(new MachineOptions { NodeCount = 2, NodeSizeBytes = 512L << 20, MinFreeKbytes = 0 });
        VmProcess process = machine.CreateProcess(homeNode: 1);
        ulong va = process.Mmap(6 << 20);
        process.Fill(va, 6 << 20, 0x5A);

        long[] sections = InitialisedSections(machine);
        long frames = machine.MemMap.FramesPerSection;
        Assert.That(sections.Select(s => machine.Topology.NodeOf(s * frames)), Is.All.EqualTo(1), "node 0 was never used");
        Zone movable = machine.Allocator.GetZone(1, ZoneType.Movable);
        Zone normal = machine.Allocator.GetZone(1, ZoneType.Normal);
        long movableTop = movable.EndPfn / frames;
        Assert.That(sections.Where(s => machine.Allocator.ZoneOf(s * frames) == movable), Is.EqualTo(new[] { movableTop - 2, movableTop - 1 }),
            "6 MiB of movable memory took the two highest sections of ZONE_MOVABLE, as a fully initialised zone would hand them out");
        Assert.That(sections.Where(s => machine.Allocator.ZoneOf(s * frames) == normal), Is.EqualTo(new[] { normal.EndPfn / frames - 1 }),
            "the page tables took one section of ZONE_NORMAL");
        Assert.That(machine.GetStats().DescriptorBytes, Is.EqualTo(3 * frames * 64));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Deferred_frames_count_as_free_in_every_counter()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        MachineStats fresh = machine.GetStats();
        foreach (ZoneStats zone in fresh.Nodes.SelectMany(n => n.Zones))
        {
            Assert.That(zone.FreePages, Is.EqualTo(zone.ManagedPages), $"{zone.Zone} {zone.Node}: free before anything is initialised");
            Assert.That(zone.BuddyInfo[PageAllocator.MaxOrder], Is.EqualTo(zone.ManagedPages >> PageAllocator.MaxOrder), "deferred sections are max-order blocks in buddyinfo");
        }
        Assert.That(machine.GetMemoryBlock(0).FreeFrames, Is.EqualTo(machine.Topology.FramesPerBlock));

        long pfn = machine.Allocator.AllocPages(3, AllocFlags.Movable);
        MachineStats after = machine.GetStats();
        Assert.That(after.AllFreePages + 8, Is.EqualTo(machine.Topology.TotalFrames), "free + in use = the arena's frames");
        Assert.That(after.MemFreeBytes, Is.EqualTo(fresh.MemFreeBytes - 8 * 4096));
        Assert.That(machine.GetMemoryBlock(machine.Topology.BlockOf(pfn)).FreeFrames, Is.EqualTo(machine.Topology.FramesPerBlock - 8));
        Assert.That(machine.Audit(), Is.Not.Empty, "the block is in use but nothing maps it");
        machine.Allocator.FreePages(pfn, 3);
        Assert.That(machine.Audit(), Is.Empty);
        Assert.That(machine.GetStats().MemFreeBytes, Is.EqualTo(fresh.MemFreeBytes));
    }

    [Test]
    public void Looking_at_a_never_used_frame_reports_it_free_and_initialises_nothing()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long head = machine.Topology.FirstPfnOfNode(1);
        PageInfo info = machine.GetPageInfo(head);
        Assert.That(info.RefCount, Is.Zero);
        Assert.That(info.MapCount, Is.Zero);
        Assert.That(info.BuddyOrder, Is.EqualTo(PageAllocator.MaxOrder), "the first frame of a section heads a max-order free block");
        Assert.That(info.Flags, Is.EqualTo(PageFlags.Buddy | PageFlags.Zeroed | PageFlags.Reported));
        Assert.That(info.Node, Is.EqualTo(1));
        Assert.That(info.Migratetype, Is.EqualTo(MigrateType.Movable));
        PageInfo tail = machine.GetPageInfo(head + 5);
        Assert.That(tail.Flags, Is.EqualTo(PageFlags.Zeroed), "never touched: reads zero");
        Assert.That(tail.BuddyOrder, Is.EqualTo(-1));
        _ = machine.GetMemoryBlock(2);
        Assert.That(machine.ReleaseFreeMemory(), Is.Zero, "nothing was ever committed");
        Assert.That(machine.GetStats().DescriptorBytes, Is.Zero, "asking committed no descriptor");
        Assert.That(InitialisedSections(machine), Is.Empty);
    }

    [Test]
    public void A_section_initialised_on_demand_looks_exactly_as_reported_before()
    {
        using var machine = TestMachines.Create(TestMachines.Small with { NodeCount = 1 });
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        long section = machine.MemMap.SectionOf(pfn) * machine.MemMap.FramesPerSection;
        Assert.That(pfn, Is.EqualTo(section), "a fresh zone hands out the lowest frame of its highest section first");
        machine.Allocator.FreePages(pfn);
        machine.Allocator.DrainAllPages();
        PageInfo info = machine.GetPageInfo(section);
        Assert.That(info.BuddyOrder, Is.EqualTo(machine.MemMap.SectionShift), "merged back into one max-order block");
        Assert.That(info.Flags & ~PageFlags.Reported, Is.EqualTo(PageFlags.Buddy), "the frame that was used is no longer known zero");
        Assert.That(machine.GetPageInfo(section + 7).Flags, Is.EqualTo(PageFlags.Zeroed));
    }

    [Test]
    public void The_allocator_grows_through_every_section_and_every_frame_can_be_allocated()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        var pages = new List<long>();
        long pfn;
        while ((pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.NoWatermark)) != PageAllocator.NoPfn)
            pages.Add(pfn);
        Assert.That(pages, Has.Count.EqualTo(machine.Topology.TotalFrames), "deferred frames are all reachable");
        Assert.That(pages.Distinct().Count(), Is.EqualTo(pages.Count));
        Assert.That(machine.MemMap.InitialisedSections, Is.EqualTo(machine.MemMap.SectionCount));
        Assert.That(machine.Allocator.Zones.Sum(z => z.DeferredPages), Is.Zero);
        foreach (long p in pages)
            machine.Allocator.FreePages(p);
        machine.Allocator.DrainAllPages();
        Assert.That(machine.GetStats().MemFreeBytes, Is.EqualTo(machine.GetStats().MemTotalBytes));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_large_order_allocation_on_a_fresh_machine_initialises_a_section()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        long pfn = machine.Allocator.AllocPages(PageAllocator.MaxOrder, AllocFlags.Movable);
        Assert.That(pfn, Is.Not.EqualTo(PageAllocator.NoPfn), "the watermark check sees deferred sections as max-order blocks");
        long unmovable = machine.Allocator.AllocPages(5);
        Assert.That(unmovable, Is.Not.EqualTo(PageAllocator.NoPfn));
        Assert.That(machine.Allocator.ZoneTypeOf(unmovable), Is.EqualTo(ZoneType.Normal));
        Assert.That(machine.Allocator.GetPageblockMigratetype(unmovable), Is.EqualTo(MigrateType.Unmovable),
            "an unmovable request steals a fresh max-order block and claims its pageblocks");
        Assert.That(machine.MemMap.InitialisedSections, Is.EqualTo(2));
        machine.Allocator.FreePages(unmovable, 5);
        machine.Allocator.FreePages(pfn, PageAllocator.MaxOrder);
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Isolating_a_never_used_range_initialises_it_and_undo_gives_it_back()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        PageAllocator allocator = machine.Allocator;
        long start = machine.Topology.FirstPfnOfBlock(1);
        long end = start + machine.Topology.FramesPerBlock;
        Assert.That(allocator.IsolatePageRange(start, end), Is.EqualTo(Errno.None));
        Assert.That(allocator.TestPagesIsolated(start, end), Is.True);
        ZoneStats zone = machine.GetStats().Nodes[0].Zones[(int)ZoneType.Movable];
        Assert.That(zone.IsolatedFreePages, Is.EqualTo(machine.Topology.FramesPerBlock));
        Assert.That(zone.FreePages, Is.Zero, "isolated frames are not allocatable");
        Assert.That(machine.GetMemoryBlock(1).IsolatedFreeFrames, Is.EqualTo(machine.Topology.FramesPerBlock));
        Assert.That(machine.Audit(), Is.Empty);
        Assert.That(allocator.AllocPages(0, AllocFlags.Movable | AllocFlags.ThisNode), Is.Not.InRange(start, end - 1));

        allocator.UndoIsolatePageRange(start, end);
        zone = machine.GetStats().Nodes[0].Zones[(int)ZoneType.Movable];
        Assert.That(zone.FreePages, Is.EqualTo(zone.ManagedPages));
        Assert.That(zone.BuddyInfo[PageAllocator.MaxOrder], Is.EqualTo(zone.ManagedPages >> PageAllocator.MaxOrder));
        Assert.That(machine.GetStats().AllFreePages + 1, Is.EqualTo(machine.Topology.TotalFrames));
    }

    [Test]
    public void Freeing_a_frame_that_was_never_allocated_is_a_bug_and_commits_nothing()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        Assert.Throws<VmBugException>(() => machine.Allocator.FreePages(machine.Topology.FirstPfnOfNode(1)));
        Assert.That(machine.GetStats().DescriptorBytes, Is.Zero);
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Audit_notices_deferred_pages_that_no_section_explains()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        Zone zone = machine.Allocator.GetZone(1, ZoneType.Normal);
        zone.DeferredPages -= machine.MemMap.FramesPerSection;
        try
        {
            Assert.That(machine.Audit(), Has.Some.Contains("DeferredPages"));
        }
        finally
        {
            zone.DeferredPages += machine.MemMap.FramesPerSection;
        }
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void Audit_notices_a_deferred_section_the_zone_can_no_longer_grow_into()
    {
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        Zone zone = machine.Allocator.GetZone(1, ZoneType.Movable);
        long cursor = zone.DeferredCursor;
        zone.DeferredCursor = machine.MemMap.SectionOf(zone.StartPfn); // as if every section had been passed
        try
        {
            Assert.That(machine.Audit(), Has.Some.Contains("can never be grown into"),
                "the counters still add up, but growth would never reach these free frames");
        }
        finally
        {
            zone.DeferredCursor = cursor;
        }
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void The_portable_memmap_initialises_sections_the_same_way()
    {
        using MachineWithRegion region = TestMachines.CreateWithRegion(4 << 20, options: TestMachines.TwoNodes with { ForcePortableArena = true });
        (Machine machine, VmProcess process, ulong va, _) = region;
        process.Fill(va, 4 << 20, 7);
        Assert.That(process.Read<byte>(va + 12345), Is.EqualTo(7));
        Assert.That(machine.GetStats().DescriptorBytes, Is.EqualTo(machine.MemMap.InitialisedSections * machine.MemMap.FramesPerSection * 64));
        Assert.That(machine.MemMap.InitialisedSections, Is.LessThan(machine.MemMap.SectionCount));
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_host_that_refuses_to_commit_a_section_fails_the_allocation_as_out_of_memory_and_loses_nothing()
    {
        // Every host commit fails: no section can be initialised, so the first fault (its page table and
        // its page both need one) cannot be served.
        var options = TestMachines.TwoNodes with { FaultInjection = new FaultInjection { Sites = FaultSites.HostCommit } };
        using MachineWithRegion region = TestMachines.CreateWithRegion(4 * 4096, options: options);
        (Machine machine, VmProcess p, ulong va, _) = region;
        long sectionsBefore = machine.MemMap.InitialisedSections;
        Assert.That(() => p.Write<long>(va, 1), Throws.TypeOf<InsufficientMemoryException>(), "no section could be committed");
        Assert.That(machine.GetFaultInjectionStats().HostCommitFailures, Is.GreaterThanOrEqualTo(1));
        Assert.That(machine.MemMap.InitialisedSections, Is.EqualTo(sectionsBefore), "a refused section stays deferred");
        Assert.That(machine.Audit(), Is.Empty, "nothing half-initialised, every deferred frame still counted free");
        machine.FaultInjector!.Reset(new FaultInjection { Sites = FaultSites.HostCommit, Times = 0 }); // the host commits again
        p.Write<long>(va, 7);
        Assert.That(p.Read<long>(va), Is.EqualTo(7));
        Assert.That(machine.MemMap.InitialisedSections, Is.GreaterThan(sectionsBefore));
        p.Exit();
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    public void A_refused_commit_leaves_the_cursor_below_sections_initialised_out_of_turn_and_the_next_grow_takes_the_next_section_down()
    {
        // One node, ZONE_MOVABLE of four sections. Isolation initialises the top section out of turn; the
        // allocator takes it off the free list, then must grow: it passes the initialised top section,
        // is refused the next one, and must leave the cursor so that the next grow takes that section.
        var options = new MachineOptions
        {
            NodeCount = 1, NodeSizeBytes = 32L << 20, BlockSizeBytes = 8L << 20, MovableBlocksPerNode = 2, MinFreeKbytes = 0,
            FaultInjection = new FaultInjection { Sites = FaultSites.HostCommit, Times = 0 },
        };
        using var machine = TestMachines.Create(options);
        PageAllocator allocator = machine.Allocator;
        Zone zone = allocator.GetZone(0, ZoneType.Movable);
        long frames = machine.MemMap.FramesPerSection;
        long top = zone.EndPfn / frames - 1;
        const AllocFlags movableHere = AllocFlags.Movable | AllocFlags.ThisNode;

        Assert.That(allocator.IsolatePageRange(top * frames, (top + 1) * frames), Is.EqualTo(Errno.None));
        allocator.UndoIsolatePageRange(top * frames, (top + 1) * frames);
        long first = allocator.AllocPages(PageAllocator.MaxOrder, movableHere);
        Assert.That(first, Is.EqualTo(top * frames), "the section isolation initialised is a free max-order block");

        machine.FaultInjector!.Reset(new FaultInjection { Sites = FaultSites.HostCommit }); // every commit refused
        Assert.That(allocator.AllocPages(PageAllocator.MaxOrder, movableHere | AllocFlags.NoWatermark), Is.EqualTo(PageAllocator.NoPfn),
            "no section can be committed (and the zone neither loops nor trips its deferred-pages assertion)");
        Assert.That(zone.DeferredCursor, Is.EqualTo(top), "the refused section top - 1 is still below the cursor");
        Assert.That(zone.DeferredPages, Is.EqualTo(3 * frames));

        machine.FaultInjector.Reset(new FaultInjection { Sites = FaultSites.HostCommit, Times = 0 });
        long second = allocator.AllocPages(PageAllocator.MaxOrder, movableHere);
        Assert.That(second, Is.EqualTo((top - 1) * frames), "the next grow takes the refused section, the highest still deferred");
        allocator.FreePages(first, PageAllocator.MaxOrder);
        allocator.FreePages(second, PageAllocator.MaxOrder);
        Assert.That(machine.Audit(), Is.Empty);
    }

    [Test]
    [Category("Stress")]
    public void Growth_isolation_injected_refusals_and_lock_free_readers_race_without_touching_an_uninitialised_descriptor()
    {
        // 2 MiB blocks: a section is one block and one pageblock (max order 9). Allocators of every order
        // and both types grow zones while host commits are refused at random, an isolator initialises
        // sections out of turn, and lock-free readers look at every kind of frame.
        var options = new MachineOptions
        {
            NodeCount = 2, NodeSizeBytes = 16L << 20, BlockSizeBytes = 2L << 20, MovableBlocksPerNode = 3, MinFreeKbytes = 0,
            FaultInjection = new FaultInjection { Sites = FaultSites.HostCommit, Probability = 0.3, Seed = 11 },
        };
        using var machine = TestMachines.Create(options);
        PageAllocator allocator = machine.Allocator;
        int maxOrder = machine.MemMap.SectionShift;
        int iterations = 4_000 * TestEnvironment.StressScale;
        var failures = new List<string>();
        int running = 3;

        void Allocate(int id)
        {
            var random = new Random(id);
            var held = new List<(long Pfn, int Order)>();
            try
            {
                for (int i = 0; i < iterations; i++)
                {
                    if (held.Count < 48 && random.Next(2) == 0)
                    {
                        int order = random.Next(8) == 0 ? random.Next(1, maxOrder + 1) : 0;
                        AllocFlags flags = (random.Next(2) == 0 ? AllocFlags.Movable : AllocFlags.None) | (random.Next(4) == 0 ? AllocFlags.NoWatermark : AllocFlags.None);
                        long pfn = allocator.AllocPages(order, flags, random.Next(2));
                        if (pfn != PageAllocator.NoPfn)
                            held.Add((pfn, order));
                    }
                    else if (held.Count > 0)
                    {
                        int index = random.Next(held.Count);
                        (long pfn, int order) = held[index];
                        held[index] = held[^1];
                        held.RemoveAt(held.Count - 1);
                        allocator.FreePages(pfn, order);
                    }
                }
            }
            catch (Exception e)
            {
                lock (failures) failures.Add($"allocator {id}: {e}");
            }
            finally
            {
                foreach ((long pfn, int order) in held)
                    allocator.FreePages(pfn, order);
                Interlocked.Decrement(ref running);
            }
        }

        void Isolate()
        {
            var random = new Random(99);
            try
            {
                while (Volatile.Read(ref running) > 0)
                {
                    int block = random.Next(machine.Topology.BlockCount);
                    long start = machine.Topology.FirstPfnOfBlock(block);
                    long end = start + machine.Topology.FramesPerBlock;
                    if (allocator.IsolatePageRange(start, end) == Errno.None)
                        allocator.UndoIsolatePageRange(start, end);
                }
            }
            catch (Exception e)
            {
                lock (failures) failures.Add($"isolator: {e}");
            }
        }

        void Read()
        {
            var random = new Random(7);
            try
            {
                while (Volatile.Read(ref running) > 0)
                {
                    _ = machine.GetPageInfo(random.NextInt64(machine.Topology.TotalFrames));
                    _ = machine.GetMemoryBlock(random.Next(machine.Topology.BlockCount));
                    _ = machine.GetStats();
                    if (random.Next(64) == 0)
                        machine.ReleaseFreeMemory();
                }
            }
            catch (Exception e)
            {
                lock (failures) failures.Add($"reader: {e}");
            }
        }

        Thread[] threads = [.. Enumerable.Range(0, 3).Select(i => new Thread(() => Allocate(i))), new Thread(Isolate), new Thread(Read)];
        foreach (Thread t in threads)
            t.Start();
        foreach (Thread t in threads)
            Assert.That(t.Join(TimeSpan.FromMinutes(2)), Is.True, "no thread hangs");
        Assert.That(failures, Is.Empty);
        allocator.DrainAllPages();
        Assert.That(machine.Audit(), Is.Empty);
        MachineStats stats = machine.GetStats();
        Assert.That(stats.MemFreeBytes, Is.EqualTo(stats.MemTotalBytes), "every frame came back");
    }

    [Test]
    public void The_descriptor_array_asks_the_host_for_no_transparent_huge_pages()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("/proc/self/smaps is Linux's");
        if (!Directory.Exists("/sys/kernel/mm/transparent_hugepage"))
            Assert.Ignore("a kernel without transparent huge pages has nothing to avoid (and no nh flag)");
        using var machine = TestMachines.Create(TestMachines.TwoNodes);
        ulong start = (ulong)machine.MemMap.BaseAddress;
        // smaps: a header line "start-end perms ..." per mapping, then fields; VmFlags "nh" is MADV_NOHUGEPAGE.
        string? flags = null;
        bool inside = false;
        foreach (string line in File.ReadLines("/proc/self/smaps"))
        {
            int dash = line.IndexOf('-', StringComparison.Ordinal);
            if (dash > 0 && line.Contains(' ', StringComparison.Ordinal) && ulong.TryParse(line.AsSpan(0, dash), System.Globalization.NumberStyles.HexNumber, null, out ulong from))
            {
                int space = line.IndexOf(' ', StringComparison.Ordinal);
                ulong to = ulong.Parse(line.AsSpan(dash + 1, space - dash - 1), System.Globalization.NumberStyles.HexNumber);
                inside = start >= from && start < to;
            }
            else if (inside && line.StartsWith("VmFlags:", StringComparison.Ordinal))
            {
                flags = line;
                break;
            }
        }
        Assert.That(flags, Is.Not.Null, "the memmap is an mmap'd region");
        Assert.That(flags!.Split(' ', StringSplitOptions.RemoveEmptyEntries), Does.Contain("nh"),
            "a section commits 64 KiB; a huge page would commit 2 MiB on its first touch");
    }
}
