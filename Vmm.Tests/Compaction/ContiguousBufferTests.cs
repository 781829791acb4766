using Vmm.Memory;
using static Vmm.Tests.Compaction.ContigAllocTests;

namespace Vmm.Tests.Compaction;

/// <summary>
/// The host's contiguous buffers (Machine.AllocateContiguous): small ones are one buddy block, large ones
/// come from alloc_contig_pages; their bytes read and write; Dispose frees every frame; offline refuses a
/// block holding one and names it; misuse and no memory throw the documented exceptions leaving nothing
/// allocated; Audit accounts a live buffer's frames.
/// </summary>
[TestFixture]
[Category("Compaction")]
public sealed class ContiguousBufferTests
{
    private const ulong Page = 4096;

    [Test]
    public void A_small_buffer_is_contiguous_zeroed_frames_whose_bytes_read_back_and_Dispose_frees_them()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        long freeBefore = machine.GetStats().AllFreePages;
        ContiguousBuffer buffer = machine.AllocateContiguous(64 << 10, node: 1);

        Assert.That(buffer.PageCount, Is.EqualTo(16));
        Assert.That(buffer.Length, Is.EqualTo(64 << 10));
        Assert.That(buffer.Node, Is.EqualTo(1));
        Assert.That(buffer.FirstPfn % 16, Is.Zero, "one order-4 buddy block, naturally aligned");
        Assert.That(machine.Allocator.ZoneTypeOf(buffer.FirstPfn), Is.EqualTo(ZoneType.Normal));
        Span<byte> span = buffer.GetSpan();
        Assert.That(span.IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "zeroed");
        for (int i = 0; i < span.Length; i++)
            span[i] = (byte)(i * 7 + 1);
        for (long pfn = buffer.FirstPfn; pfn < buffer.FirstPfn + buffer.PageCount; pfn++)
        {
            Assert.That(machine.MemMap.RefCount(pfn), Is.EqualTo(1), "each frame is held by the buffer");
            int offset = (int)(pfn - buffer.FirstPfn) * (int)Page;
            Assert.That(machine.GetFrameSpan(pfn)[5], Is.EqualTo((byte)((offset + 5) * 7 + 1)), "the span is the frames' own bytes, in order");
        }
        Assert.That(buffer.GetSpan(4096, 3).ToArray(), Is.EqualTo(new[] { unchecked((byte)(4096 * 7 + 1)), unchecked((byte)(4097 * 7 + 1)), unchecked((byte)(4098 * 7 + 1)) }), "a slice at an offset");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 16));
        TestMachines.AssertAuditClean(machine, "a live buffer's frames are accounted");

        buffer.Dispose();
        buffer.Dispose();
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "Dispose gave every frame back");
        Assert.That(() => buffer.GetSpan(), Throws.TypeOf<ObjectDisposedException>());
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_buffer_of_a_size_between_powers_of_two_frees_the_rest_of_its_block_at_once()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        long freeBefore = machine.GetStats().AllFreePages;
        using ContiguousBuffer buffer = machine.AllocateContiguous(5 * 4096 - 100);
        Assert.That(buffer.PageCount, Is.EqualTo(5), "rounded up to whole pages");
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 5), "the order-3 block's last three frames went back (alloc_pages_exact)");
        for (long pfn = buffer.FirstPfn + 5; pfn < buffer.FirstPfn + 8; pfn++)
            Assert.That(machine.MemMap.RefCount(pfn), Is.Zero);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_large_buffer_clears_a_range_full_of_a_process_pages_keeping_every_byte_and_Dispose_frees_it()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        const int pages = 3200;
        (VmProcess p, ulong va, byte[] data) = FillNode0(machine, pages);
        long freeBefore = machine.GetStats().AllFreePages;

        using (ContiguousBuffer buffer = machine.AllocateContiguous(6L << 20, node: 0))
        {
            Assert.That(buffer.PageCount, Is.EqualTo(1536));
            Assert.That(buffer.Node, Is.EqualTo(0));
            Assert.That(buffer.FirstPfn % PageAllocator.PageblockFrames, Is.Zero, "candidates are pageblock aligned");
            Memory<byte> memory = buffer.AsMemory();
            Assert.That(memory.Length, Is.EqualTo(6 << 20));
            Assert.That(memory.Span.IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "zeroed: no byte of the pages that were there");
            memory.Span.Fill(0xA5);
            Assert.That(buffer.GetSpan((6 << 20) - 1, 1)[0], Is.EqualTo(0xA5));
            Assert.That(machine.Migration.SucceededFor(MigrateReason.ContigRange), Is.GreaterThan(0), "the range held the process's pages");
            byte[] now = Vmm.Tests.Migration.MigrationTestHelpers.ReadPages(p, va, pages);
            Assert.That(now.AsSpan().SequenceEqual(data), Is.True, "every byte of the process is as written");
            Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore - 1536));
            TestMachines.AssertAuditClean(machine, "a live buffer's frames are accounted");
            buffer.Dispose();
            Assert.That(() => memory.Span.Length, Throws.TypeOf<ObjectDisposedException>(), "a Memory taken earlier is dead after Dispose");
        }
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "Dispose gave every frame back");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Offline_refuses_a_block_holding_a_buffer_and_names_the_buffer()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        using ContiguousBuffer buffer = machine.AllocateContiguous(64 << 10, node: 1);
        MemoryBlock block = machine.Hotplug.GetBlock(machine.Topology.BlockOf(buffer.FirstPfn));

        Assert.That(block.CanOffline(out IReadOnlyList<OfflineBlocker> predicted), Is.False);
        Assert.That(predicted.Select(b => b.Reason), Has.Member(OfflineBlockReason.ContiguousBuffer), "the dry run names the buffer");
        OfflineResult result = block.Offline();

        Assert.That(result.Error, Is.EqualTo(Errno.EBUSY));
        Assert.That(result.Blockers, Has.Count.EqualTo(1));
        Assert.That(result.Blockers[0].Reason, Is.EqualTo(OfflineBlockReason.ContiguousBuffer));
        Assert.That(result.Blockers[0].Pfn, Is.InRange(buffer.FirstPfn, buffer.FirstPfn + buffer.PageCount - 1));
        Assert.That(result.Blockers[0].Description, Does.Contain("contiguous buffer"));
        Assert.That(block.IsOnline, Is.True);
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_range_holding_a_live_buffer_is_refused_by_alloc_contig_range_at_isolation()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        using ContiguousBuffer buffer = machine.AllocateContiguous(64 << 10, node: 1);
        long start = buffer.FirstPfn & ~(long)(PageAllocator.PageblockFrames - 1);
        Assert.That(machine.Contig.AllocContigRange(start, start + PageAllocator.PageblockFrames, CancellationToken.None, out long moved),
            Is.EqualTo(Errno.EBUSY), "a buffer's frames are unmovable");
        Assert.That(moved, Is.Zero);
        Assert.That(buffer.GetSpan().IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "the buffer is untouched");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void Misuse_throws_and_no_memory_throws_InsufficientMemoryException_leaving_nothing_allocated()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        long freeBefore = machine.GetStats().AllFreePages;
        Assert.That(() => machine.AllocateContiguous(0), Throws.TypeOf<ArgumentOutOfRangeException>());
        Assert.That(() => machine.AllocateContiguous(4096, node: 2), Throws.TypeOf<ArgumentOutOfRangeException>());
        Assert.That(() => machine.AllocateContiguous(4096, node: -2), Throws.TypeOf<ArgumentOutOfRangeException>());
        Assert.That(() => machine.AllocateContiguous(20L << 20), Throws.TypeOf<InsufficientMemoryException>(), "no node has 20 MiB");
        Assert.That(() => machine.AllocateContiguous(1L << 40), Throws.TypeOf<InsufficientMemoryException>(), "more than the machine");
        Assert.That(() => machine.AllocateContiguous(8L << 20, 0, new CancellationToken(canceled: true)), Throws.InstanceOf<OperationCanceledException>());
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "nothing left allocated");
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_small_buffer_with_no_free_block_of_its_order_throws_InsufficientMemoryException()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        var held = new List<ContiguousBuffer>();
        try
        {
            // Every max-order block of both nodes' ZONE_NORMAL taken, then one page more of each order-0 left.
            while (true)
            {
                try
                {
                    held.Add(machine.AllocateContiguous(4L << 20));
                }
                catch (InsufficientMemoryException)
                {
                    break;
                }
            }
            Assert.That(held, Is.Not.Empty);
            Assert.That(() => machine.AllocateContiguous(4L << 20), Throws.TypeOf<InsufficientMemoryException>());
            TestMachines.AssertAuditClean(machine);
        }
        finally
        {
            foreach (ContiguousBuffer b in held)
                b.Dispose();
        }
        TestMachines.AssertAuditClean(machine);
    }

    [Test]
    public void A_buffer_outliving_its_machine_keeps_the_arena_mapped_until_it_is_disposed()
    {
        Machine machine = TestMachines.Create(AllNormal);
        ContiguousBuffer buffer = machine.AllocateContiguous(8192);
        Span<byte> span = buffer.GetSpan();
        span[0] = 42;
        var arena = machine.Arena;
        Assert.That(arena.PinReferences, Is.EqualTo(1));
        machine.Dispose();
        Assert.That(span[1], Is.Zero, "the range is still mapped (its memory given back)");
        Assert.That(buffer.IsDisposed, Is.True, "the machine's Dispose ends the buffer");
        Assert.That(() => buffer.GetSpan(), Throws.TypeOf<ObjectDisposedException>());
        buffer.Dispose();
        Assert.That(arena.PinReferences, Is.Zero, "the buffer let go of the arena");
    }
}
