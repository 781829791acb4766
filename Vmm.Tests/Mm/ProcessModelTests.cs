using Vmm.Mm;

namespace Vmm.Tests.Mm;

/// <summary>
/// Processes against a shadow model: random mmap, munmap, mprotect, madvise, write, read, fork and exit
/// on several processes, with a shadow copy of every process's memory as the oracle and Audit after
/// every step. VMM_STRESS_SCALE=N runs N times more steps.
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class ProcessModelTests
{
    private const ulong Page = 4096;
    private const ulong Window = 0x4000_0000; // fixed mappings land in [Window, Window + 512 pages)

    private sealed class ShadowPage
    {
        public byte[] Data = new byte[Page];
    }

    private sealed class ShadowProcess
    {
        public required VmProcess Process;
        // page address -> (protection, contents, shared?)
        public Dictionary<ulong, (Protection Prot, ShadowPage Contents, bool Shared)> Pages = [];
    }

    [TestCase(11)]
    [TestCase(12)]
    public void Random_process_operations_match_the_shadow_and_Audit_stays_clean(int seed)
    {
        var random = new Random(TestEnvironment.Seed(seed));
        using var machine = new Machine(new MachineOptions { NodeCount = 2, NodeSizeBytes = 16L << 20, BlockSizeBytes = 8L << 20, MinFreeKbytes = 0, PoisonFreedFrames = seed % 2 == 0 });
        var procs = new List<ShadowProcess>();
        for (int i = 0; i < 3; i++)
            procs.Add(new ShadowProcess { Process = machine.CreateProcess(homeNode: i % 2) });
        long initialFree = machine.GetStats().AllFreePages;
        int steps = 10_000 * TestEnvironment.StressScale;
        var counts = new int[10];

        for (int step = 0; step < steps; step++)
        {
            ShadowProcess sp = procs[random.Next(procs.Count)];
            VmProcess p = sp.Process;
            int action = random.Next(100);
            string what;
            if (action < 10 && sp.Pages.Count < 400)
            {
                what = "mmap";
                counts[0]++;
                ulong pages = (ulong)random.Next(1, 24);
                bool shared = random.Next(4) == 0;
                bool fixedAt = random.Next(3) == 0;
                ulong address = fixedAt ? Window + (ulong)random.Next(0, 512 - (int)pages) * Page : 0;
                Protection prot = random.Next(5) == 0 ? Protection.Read : Protection.ReadWrite;
                MapFlags flags = (shared ? MapFlags.Shared : MapFlags.Private) | (fixedAt ? MapFlags.Fixed : 0);
                Errno result = p.Mmap(address, pages * Page, prot, flags, out ulong mapped);
                Assert.That(result, Is.EqualTo(Errno.None), $"step {step}: {what}");
                if (fixedAt)
                    Assert.That(mapped, Is.EqualTo(address));
                for (ulong i = 0; i < pages; i++)
                {
                    Assert.That(fixedAt || !sp.Pages.ContainsKey(mapped + i * Page), Is.True, $"step {step}: mmap reused a mapped address");
                    sp.Pages[mapped + i * Page] = (prot, new ShadowPage(), shared);
                }
            }
            else if (action < 18 && sp.Pages.Count > 0)
            {
                what = "munmap";
                counts[1]++;
                (ulong start, ulong length) = RandomRange(random, sp);
                bool beyondUserSpace = start + length > 0x7FFF_FFFF_F000UL;
                Assert.That(p.Munmap(start, length), Is.EqualTo(beyondUserSpace ? Errno.EINVAL : Errno.None), $"step {step}: {what}");
                for (ulong a = start; a < start + length && !beyondUserSpace; a += Page)
                    sp.Pages.Remove(a);
            }
            else if (action < 24 && sp.Pages.Count > 0)
            {
                what = "mprotect";
                counts[2]++;
                (ulong start, ulong length) = RandomRange(random, sp);
                Protection prot = random.Next(3) switch { 0 => Protection.None, 1 => Protection.Read, _ => Protection.ReadWrite };
                Errno expected = Errno.None;
                for (ulong a = start; a < start + length; a += Page)
                {
                    if (!sp.Pages.TryGetValue(a, out var entry))
                    {
                        expected = Errno.ENOMEM;
                        break;
                    }
                    sp.Pages[a] = entry with { Prot = prot };
                }
                Assert.That(p.Mprotect(start, length, prot), Is.EqualTo(expected), $"step {step}: {what}");
            }
            else if (action < 27 && sp.Pages.Count > 0)
            {
                what = "madvise(DONTNEED)";
                counts[3]++;
                (ulong start, ulong length) = RandomRange(random, sp);
                Errno expected = Errno.None;
                for (ulong a = start; a < start + length; a += Page)
                {
                    if (!sp.Pages.TryGetValue(a, out var entry))
                        expected = Errno.ENOMEM;
                    else if (!entry.Shared)
                        sp.Pages[a] = entry with { Contents = new ShadowPage() };
                }
                Assert.That(p.Madvise(start, length, Advice.DontNeed), Is.EqualTo(expected), $"step {step}: {what}");
            }
            else if (action < 65 && sp.Pages.Count > 0)
            {
                what = "write";
                counts[4]++;
                ulong start = RandomMappedAddress(random, sp) + (ulong)random.Next(0, (int)Page);
                int length = random.Next(1, 3 * (int)Page);
                byte[] data = new byte[length];
                random.NextBytes(data);
                ulong? faultAt = null;
                for (ulong a = start & ~(Page - 1); a < start + (ulong)length; a += Page)
                {
                    if (!sp.Pages.TryGetValue(a, out var entry) || entry.Prot != Protection.ReadWrite)
                    {
                        faultAt = Math.Max(a, start);
                        break;
                    }
                }
                try
                {
                    p.Write(start, data);
                    Assert.That(faultAt, Is.Null, $"step {step}: the write should have faulted");
                }
                catch (SegmentationFault fault)
                {
                    Assert.That(fault.Address, Is.EqualTo(faultAt), $"step {step}: faulting address");
                    Assert.That(fault.Kind, Is.EqualTo(AccessKind.Write));
                }
                ulong end = faultAt ?? start + (ulong)length;
                for (ulong a = start; a < end; a++)
                    sp.Pages[a & ~(Page - 1)].Contents.Data[a & (Page - 1)] = data[a - start];
            }
            else if (action < 90 && sp.Pages.Count > 0)
            {
                what = "read";
                counts[5]++;
                ulong start = RandomMappedAddress(random, sp) + (ulong)random.Next(0, (int)Page);
                int length = random.Next(1, 2 * (int)Page);
                byte[] data = new byte[length];
                ulong? faultAt = null;
                for (ulong a = start & ~(Page - 1); a < start + (ulong)length; a += Page)
                {
                    if (!sp.Pages.TryGetValue(a, out var entry) || entry.Prot == Protection.None)
                    {
                        faultAt = Math.Max(a, start);
                        break;
                    }
                }
                try
                {
                    p.Read(start, data);
                    Assert.That(faultAt, Is.Null, $"step {step}: the read should have faulted");
                }
                catch (SegmentationFault fault)
                {
                    Assert.That(fault.Address, Is.EqualTo(faultAt), $"step {step}: faulting address");
                }
                ulong end = faultAt ?? start + (ulong)length;
                for (ulong a = start; a < end; a++)
                {
                    byte expected = sp.Pages[a & ~(Page - 1)].Contents.Data[a & (Page - 1)];
                    if (data[a - start] != expected)
                        Assert.Fail($"step {step}: byte at 0x{a:x} of {p} reads {data[a - start]}, the shadow says {expected}");
                }
            }
            else if (action < 95 && procs.Count < 6)
            {
                what = "fork";
                counts[6]++;
                var child = new ShadowProcess { Process = p.Fork() };
                foreach ((ulong a, var entry) in sp.Pages)
                {
                    ShadowPage contents = entry.Shared ? entry.Contents : new ShadowPage { Data = (byte[])entry.Contents.Data.Clone() };
                    child.Pages[a] = (entry.Prot, contents, entry.Shared);
                }
                procs.Add(child);
            }
            else if (procs.Count > 1)
            {
                what = "exit";
                counts[7]++;
                p.Exit();
                procs.Remove(sp);
            }
            else
            {
                continue;
            }

            IReadOnlyList<string> problems = machine.Audit();
            if (problems.Count > 0)
                Assert.Fail($"step {step} ({what} on {p}): Audit found {string.Join("; ", problems.Take(5))}");
        }

        // Every byte of every process, one last time.
        foreach (ShadowProcess sp in procs)
        {
            byte[] page = new byte[Page];
            foreach ((ulong a, var entry) in sp.Pages)
            {
                if (entry.Prot == Protection.None)
                    continue;
                sp.Process.Read(a, page);
                Assert.That(page, Is.EqualTo(entry.Contents.Data), $"page 0x{a:x} of {sp.Process}");
            }
        }
        foreach (ShadowProcess sp in procs)
            sp.Process.Exit();
        Assert.That(machine.Audit(), Is.Empty);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(initialFree + (machine.ZeroPagePfnIfAllocated >= 0 ? -1 : 0)),
            "after every exit, every frame but the zero page is free");
        Assert.That(counts.Take(8), Is.All.GreaterThan(0), "every operation ran");
    }

    private static ulong RandomMappedAddress(Random random, ShadowProcess sp) => sp.Pages.Keys.ElementAt(random.Next(sp.Pages.Count));

    private static (ulong Start, ulong Length) RandomRange(Random random, ShadowProcess sp)
    {
        ulong start = RandomMappedAddress(random, sp) - (ulong)random.Next(0, 3) * Page;
        return (start, (ulong)random.Next(1, 12) * Page);
    }
}
