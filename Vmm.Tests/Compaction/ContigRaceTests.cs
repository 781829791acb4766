using static Vmm.Tests.Compaction.ContigAllocTests;

namespace Vmm.Tests.Compaction;

/// <summary>
/// Contiguous allocation while a writer keeps writing the pages it moves: every write lands (the writer
/// waits on migration entries, never writes a frame that was taken), and every byte is as the writer's
/// shadow says afterwards. Bounded by rounds (VMM_STRESS_SCALE multiplies them).
/// </summary>
[TestFixture]
[Category("Compaction")]
public sealed class ContigRaceTests
{
    private const int Page = 4096;

    [Test]
    public void A_large_buffer_taken_while_a_writer_writes_the_pages_it_moves_loses_no_write()
    {
        using Machine machine = TestMachines.Create(AllNormal);
        const int pages = 3200;
        (VmProcess p, ulong va, byte[] shadow) = FillNode0(machine, pages);
        int rounds = 4 * TestEnvironment.StressScale;
        for (int round = 0; round < rounds; round++)
        {
            using var stop = new CancellationTokenSource();
            int seed = TestEnvironment.Seed(100 + round);
            var writer = Task.Run(() =>
            {
                // The shadow is this thread's until it is joined.
                var random = new Random(seed);
                var value = new byte[8];
                long writes = 0;
                while (!stop.IsCancellationRequested || writes < 1000)
                {
                    int offset = random.Next(pages) * Page + random.Next(Page / 8) * 8;
                    random.NextBytes(value);
                    p.Write(va + (ulong)offset, value);
                    value.CopyTo(shadow, offset);
                    writes++;
                }
                return writes;
            });
            long movedBefore = machine.Migration.SucceededFor(MigrateReason.ContigRange);
            ContiguousBuffer buffer;
            try
            {
                buffer = machine.AllocateContiguous(6L << 20, node: 0);
            }
            finally
            {
                stop.Cancel();
            }
            long writes = writer.GetAwaiter().GetResult();
            Assert.That(writes, Is.GreaterThanOrEqualTo(1000));
            if (round == 0)
                Assert.That(machine.Migration.SucceededFor(MigrateReason.ContigRange) - movedBefore, Is.GreaterThan(1000), "node 0 was full: the range's pages moved while the writer wrote");
            Assert.That(buffer.GetSpan().IndexOfAnyExcept((byte)0), Is.EqualTo(-1), $"round {round}: the buffer is zeroed: no write of the writer reached a taken frame");
            byte[] now = Vmm.Tests.Migration.MigrationTestHelpers.ReadPages(p, va, pages);
            int at = now.AsSpan().CommonPrefixLength(shadow);
            Assert.That(at, Is.EqualTo(shadow.Length), $"round {round}: every write landed (first difference at byte {at})");
            TestMachines.AssertAuditClean(machine);
            buffer.Dispose();
        }
        TestMachines.AssertAuditClean(machine);
    }
}
