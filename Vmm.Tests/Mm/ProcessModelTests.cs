using Vmm.Mm;
using Vmm.Tests.Robustness;

namespace Vmm.Tests.Mm;

/// <summary>
/// Processes against a shadow model: random mmap, munmap, mprotect, madvise, write, read, fork and exit
/// on several processes, with a shadow copy of every process's memory as the oracle and Audit after
/// every step (the oracle is Robustness/ShadowMemory.cs, shared with the API fuzzer). VMM_STRESS_SCALE=N runs
/// N times more steps.
/// </summary>
[TestFixture]
[Category("Stress")] // the random model runs for about 20 s (more with VMM_STRESS_SCALE): too long for Smoke
public sealed class ProcessModelTests
{
    private const ulong Page = 4096;
    private const ulong Window = 0x4000_0000; // fixed mappings land in [Window, Window + 512 pages)

    [TestCase(11)]
    [TestCase(12)]
    public void Random_process_operations_match_the_shadow_and_Audit_stays_clean(int seed)
    {
        var random = new Random(TestEnvironment.Seed(seed));
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { PoisonFreedFrames = seed % 2 == 0 });
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
                    Assert.That(fixedAt || !sp.Pages.ContainsKey(mapped + i * Page), Is.True, $"step {step}: mmap reused a mapped address");
                sp.Map(mapped, pages * Page, prot, shared);
            }
            else if (action < 18 && sp.Pages.Count > 0)
            {
                what = "munmap";
                counts[1]++;
                (ulong start, ulong length) = RandomRange(random, sp);
                bool beyondUserSpace = start + length > 0x7FFF_FFFF_F000UL;
                Assert.That(p.Munmap(start, length), Is.EqualTo(beyondUserSpace ? Errno.EINVAL : Errno.None), $"step {step}: {what}");
                if (!beyondUserSpace)
                    sp.Unmap(start, length);
            }
            else if (action < 24 && sp.Pages.Count > 0)
            {
                what = "mprotect";
                counts[2]++;
                (ulong start, ulong length) = RandomRange(random, sp);
                Protection prot = random.Next(3) switch { 0 => Protection.None, 1 => Protection.Read, _ => Protection.ReadWrite };
                Errno expected = sp.Protect(start, length, prot);
                Assert.That(p.Mprotect(start, length, prot), Is.EqualTo(expected), $"step {step}: {what}");
            }
            else if (action < 27 && sp.Pages.Count > 0)
            {
                what = "madvise(DONTNEED)";
                counts[3]++;
                (ulong start, ulong length) = RandomRange(random, sp);
                Errno expected = sp.DontNeed(start, length);
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
                ulong? faultAt = sp.FirstFault(start, (ulong)length, write: true);
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
                sp.Store(start, data, faultAt ?? start + (ulong)length);
            }
            else if (action < 90 && sp.Pages.Count > 0)
            {
                what = "read";
                counts[5]++;
                ulong start = RandomMappedAddress(random, sp) + (ulong)random.Next(0, (int)Page);
                int length = random.Next(1, 2 * (int)Page);
                byte[] data = new byte[length];
                ulong? faultAt = sp.FirstFault(start, (ulong)length, write: false);
                try
                {
                    p.Read(start, data);
                    Assert.That(faultAt, Is.Null, $"step {step}: the read should have faulted");
                }
                catch (SegmentationFault fault)
                {
                    Assert.That(fault.Address, Is.EqualTo(faultAt), $"step {step}: faulting address");
                }
                if (sp.Compare(start, data, faultAt ?? start + (ulong)length) is { } difference)
                    Assert.Fail($"step {step}: {difference}");
            }
            else if (action < 95 && procs.Count < 6)
            {
                what = "fork";
                counts[6]++;
                procs.Add(sp.Fork(p.Fork()));
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
            Assert.That(sp.CompareAll(), Is.Null, "every byte of every readable page");
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
