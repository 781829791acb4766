// HotplugDemo's processes: each maps one buffer, whose first half is the same "library image" in every
// process (madvised MADV_MERGEABLE, so ksmd merges it into KSM pages) and whose second half is private
// data that a writer thread keeps rewriting while blocks go offline and online. The writer checks the
// page it is about to write still holds what it wrote last (a page moved under it must keep its bytes),
// and at the end every byte of every page is compared with what it must hold (the rest of the demo is
// in HotplugDemo.cs).
//
// Page contents are pseudo-random from a seed (DemoBuffer.FillRandom), so a page is rebuilt, not
// stored; a private page's first 8 bytes are its stamp: the process, the page and how many times the
// writer has rewritten it.
namespace Vmm.Cli;

internal sealed partial class HotplugDemo
{
    /// <summary>One process of the demo, its buffer, and the writer thread that rewrites its private half.</summary>
    internal sealed class DemoProcess
    {
        private readonly uint[] _versions;
        private Thread? _thread;
        private volatile bool _stop;
        private long _writes;

        public DemoProcess(int index, VmProcess process, ulong address, int pages)
        {
            Index = index;
            Process = process;
            Address = address;
            Pages = pages;
            _versions = new uint[PrivatePages];
        }

        /// <summary>0-based number of the process in the demo (P1 is 0).</summary>
        public int Index { get; }

        public VmProcess Process { get; }

        public ulong Address { get; }

        /// <summary>Pages of the whole buffer.</summary>
        public int Pages { get; }

        /// <summary>Pages of the merged half (the first half).</summary>
        public int SharedPages => Pages / 2;

        /// <summary>Pages of the private half, which the writer rewrites.</summary>
        public int PrivatePages => Pages - SharedPages;

        public ulong PrivateAddress => Address + (ulong)SharedPages * PageSize;

        /// <summary>Stamps written by the writer so far.</summary>
        public long Writes => Interlocked.Read(ref _writes);

        /// <summary>The first wrong value the writer read back, or null.</summary>
        public string? Problem { get; private set; }

        /// <summary>What made the writer stop early: a bug, rethrown once every writer has stopped (exit code 3).</summary>
        public Exception? Failure { get; private set; }

        /// <summary>Writes the whole buffer: the merged half, then the private half with version 0 stamps.</summary>
        public void Fill()
        {
            byte[] page = new byte[PageSize];
            for (int p = 0; p < Pages; p++)
            {
                Expected(p, page);
                Process.Write(Address + (ulong)p * PageSize, page);
            }
        }

        /// <summary>What page <paramref name="page"/> of the buffer must hold now (with the writer stopped).</summary>
        public void Expected(int page, Span<byte> destination)
        {
            if (page < SharedPages)
            {
                DemoBuffer.FillRandom(destination, Seed(1, 0, page));
                return;
            }
            int own = page - SharedPages;
            DemoBuffer.FillRandom(destination, Seed(3, Index, own));
            BitConverter.TryWriteBytes(destination, Stamp(own, _versions[own]));
        }

        private static ulong Seed(int region, int process, int index) =>
            ((ulong)region << 56) | ((ulong)(uint)process << 32) | (uint)index;

        /// <summary>A private page's first 8 bytes: process, page and version.</summary>
        private long Stamp(int own, uint version) => (long)(((ulong)(uint)Index << 56) | ((ulong)(uint)own << 32) | version);

        /// <summary>Starts the writer thread.</summary>
        public void Start()
        {
            _thread = new Thread(Write) { IsBackground = true, Name = $"hotplug writer P{Index + 1}" };
            _thread.Start();
        }

        /// <summary>Stops the writer and waits for it (a writer that failed left its exception in <see cref="Failure"/>).</summary>
        public void Stop()
        {
            _stop = true;
            _thread?.Join();
            _thread = null;
        }

        /// <summary>
        /// The writer: sweeps the private half, reading each stamp back before writing the next one, and
        /// rests a millisecond between sweeps so that the offline and ksmd share the processor with it.
        /// </summary>
        private void Write()
        {
            try
            {
                while (!_stop && Problem is null)
                {
                    for (int own = 0; own < PrivatePages && !_stop; own++)
                    {
                        ulong va = PrivateAddress + (ulong)own * PageSize;
                        long seen = Process.Read<long>(va);
                        long expected = Stamp(own, _versions[own]);
                        if (seen != expected)
                        {
                            Problem = $"P{Index + 1} pid {Process.Pid} private page {own}: read {seen:X16}, wrote {expected:X16}";
                            return;
                        }
                        uint next = _versions[own] + 1;
                        Process.Write(va, Stamp(own, next));
                        _versions[own] = next; // only this thread writes it; Stop's Join publishes it
                        Interlocked.Increment(ref _writes);
                    }
                    Thread.Sleep(1);
                }
            }
            catch (Exception e)
            {
                Failure = e;
            }
        }

        /// <summary>Compares every byte of the buffer with what it must hold; the writer must be stopped. Null when all match.</summary>
        public string? Verify()
        {
            byte[] expected = new byte[PageSize], actual = new byte[PageSize];
            for (int p = 0; p < Pages; p++)
            {
                Expected(p, expected);
                Process.Read(Address + (ulong)p * PageSize, actual);
                int at = expected.AsSpan().CommonPrefixLength(actual);
                if (at < PageSize)
                {
                    string half = p < SharedPages ? "merged" : "private";
                    return $"P{Index + 1} pid {Process.Pid} page {p} ({half} half), byte {at}: read 0x{actual[at]:X2}, expected 0x{expected[at]:X2}";
                }
            }
            return null;
        }
    }
}
