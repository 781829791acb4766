// Tests of the 4 KiB page kernels against simple byte-loop references, for every vector width.
//
// The explicit-width internal overloads let every width run here. Widths the CPU does not accelerate
// still run (System.Runtime.Intrinsics emulates them in software), which checks their lane logic too;
// the CRC32C implementations the CPU lacks are skipped, because those throw PlatformNotSupportedException.
using System.Runtime.InteropServices;
using Vmm.Native;

namespace Vmm.Tests.Native;

[TestFixture]
[Category("Smoke")]
public sealed unsafe class PageOpsTests
{
    private const int PageSize = PageOps.PageSize;

    // Each buffer is three pages: the page under test starts one page in (plus the unaligned offset), so
    // there is at least a page of guard bytes on either side of it.
    private const int BufferSize = 3 * PageSize;
    private const byte Guard = 0xA5;

    private byte* _bufA;
    private byte* _bufB;

    /// <summary>Every width, by name (the enum is internal, so the test parameter is its name).</summary>
    public static IEnumerable<string> Widths => Enum.GetNames<PageOpsWidth>();

    /// <summary>Every CRC32C implementation that can run on this machine.</summary>
    public static IEnumerable<string> Crcs =>
        Enum.GetValues<PageOpsCrc>().Where(PageOps.IsSupported).Select(c => c.ToString());

    /// <summary>Byte offsets of the page from a page-aligned address: aligned, and every misalignment up to 63.</summary>
    private static IEnumerable<int> Offsets => Enumerable.Range(0, 64);

    [SetUp]
    public void SetUp()
    {
        _bufA = (byte*)NativeMemory.AlignedAlloc(BufferSize, PageSize);
        _bufB = (byte*)NativeMemory.AlignedAlloc(BufferSize, PageSize);
        ResetGuards();
    }

    [TearDown]
    public void TearDown()
    {
        NativeMemory.AlignedFree(_bufA);
        NativeMemory.AlignedFree(_bufB);
        _bufA = null;
        _bufB = null;
    }

    // ------------------------------------------------------------------------------------------------
    // PageEquals
    // ------------------------------------------------------------------------------------------------

    [TestCaseSource(nameof(Widths))]
    public void PageEquals_matches_the_byte_loop_on_random_and_equal_pages_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(1);
        foreach (int offset in Offsets)
        {
            byte* a = PageA(offset), b = PageB(63 - offset);
            Randomize(rng, a);
            Randomize(rng, b);
            Assert.That(PageOps.PageEquals(a, b, w), Is.EqualTo(RefEquals(a, b)), $"because independent random pages differ (offset {offset})");
            Page(a).CopyTo(Page(b));
            Assert.That(PageOps.PageEquals(a, b, w), Is.True, $"because a copied page equals its source (offset {offset})");
        }
    }

    [TestCaseSource(nameof(Widths))]
    public void PageEquals_detects_a_single_differing_byte_at_every_position_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(2);
        byte* a = PageA(0), b = PageB(0);
        Randomize(rng, a);
        Page(a).CopyTo(Page(b));
        for (int i = 0; i < PageSize; i++)
        {
            byte original = b[i];
            b[i] ^= (byte)rng.Next(1, 256);
            Assert.That(PageOps.PageEquals(a, b, w), Is.False, $"because the pages differ at byte {i}");
            Assert.That(PageOps.PageEquals(b, a, w), Is.False, $"because the pages differ at byte {i} (swapped)");
            b[i] = original;
        }
        Assert.That(PageOps.PageEquals(a, b, w), Is.True, "because every change was undone");
    }

    // ------------------------------------------------------------------------------------------------
    // Compare
    // ------------------------------------------------------------------------------------------------

    [TestCaseSource(nameof(Widths))]
    public void Compare_orders_pages_like_memcmp_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(3);
        byte* a = PageA(0), b = PageB(0);
        for (int round = 0; round < 500; round++)
        {
            // A random common prefix, then random bytes: the first difference lands anywhere.
            Randomize(rng, a);
            Randomize(rng, b);
            int prefix = rng.Next(0, PageSize + 1);
            new Span<byte>(a, prefix).CopyTo(new Span<byte>(b, prefix));
            Assert.That(PageOps.Compare(a, b, w), Is.EqualTo(RefCompare(a, b)), $"because Compare follows memcmp (common prefix {prefix})");
            Assert.That(PageOps.Compare(b, a, w), Is.EqualTo(RefCompare(b, a)), $"because Compare follows memcmp (swapped, common prefix {prefix})");
        }
        Page(a).CopyTo(Page(b));
        Assert.That(PageOps.Compare(a, b, w), Is.Zero, "because equal pages compare equal");
    }

    [TestCaseSource(nameof(Widths))]
    public void Compare_orders_by_the_first_differing_byte_as_unsigned_at_every_position_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(4);
        byte* a = PageA(0), b = PageB(0);
        Randomize(rng, a);
        Page(a).CopyTo(Page(b));
        for (int i = 0; i < PageSize; i++)
        {
            byte original = a[i];

            // 0x80 > 0x7F unsigned (but < as sbyte).
            a[i] = 0x80;
            b[i] = 0x7F;
            Assert.That(PageOps.Compare(a, b, w), Is.EqualTo(1), $"because 0x80 > 0x7F unsigned at byte {i}");
            Assert.That(PageOps.Compare(b, a, w), Is.EqualTo(-1), $"because 0x7F < 0x80 unsigned at byte {i}");

            // A later difference in the opposite direction must not matter.
            int later = i + 1 < PageSize ? rng.Next(i + 1, PageSize) : -1;
            if (later >= 0)
            {
                byte laterA = a[later], laterB = b[later];
                a[later] = 0x00;
                b[later] = 0xFF;
                Assert.That(PageOps.Compare(a, b, w), Is.EqualTo(1), $"because the first difference (byte {i}) decides, not byte {later}");
                Assert.That(PageOps.Compare(b, a, w), Is.EqualTo(-1), $"because the first difference (byte {i}) decides, not byte {later} (swapped)");
                a[later] = laterA;
                b[later] = laterB;
            }

            // Random unequal values.
            byte x = (byte)rng.Next(256), y = (byte)rng.Next(256);
            if (x == y)
                y ^= 1;
            a[i] = x;
            b[i] = y;
            Assert.That(PageOps.Compare(a, b, w), Is.EqualTo(x < y ? -1 : 1), $"because 0x{x:X2} vs 0x{y:X2} at byte {i} orders the pages");

            a[i] = original;
            b[i] = original;
        }
        Assert.That(PageOps.Compare(a, b, w), Is.Zero, "because every change was undone");
    }

    // ------------------------------------------------------------------------------------------------
    // IsZero
    // ------------------------------------------------------------------------------------------------

    [TestCaseSource(nameof(Widths))]
    public void IsZero_accepts_only_the_all_zero_page_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(5);
        byte* p = PageA(0);
        Page(p).Clear();
        Assert.That(PageOps.IsZero(p, w), Is.True, "because the page is all zero");
        for (int i = 0; i < PageSize; i++)
        {
            p[i] = i % 3 == 0 ? (byte)0x01 : i % 3 == 1 ? (byte)0x80 : (byte)rng.Next(1, 256);
            Assert.That(PageOps.IsZero(p, w), Is.False, $"because byte {i} is 0x{p[i]:X2}");
            p[i] = 0;
        }
        Assert.That(PageOps.IsZero(p, w), Is.True, "because every change was undone");
        Randomize(rng, p);
        Assert.That(PageOps.IsZero(p, w), Is.EqualTo(RefIsZero(p)), "because a random page is not zero");
    }

    // ------------------------------------------------------------------------------------------------
    // Checksum
    // ------------------------------------------------------------------------------------------------

    [Test]
    public void The_reference_crc32c_gives_the_standard_check_value()
    {
        // CRC32C("123456789") = 0xE3069283 (RFC 3720 / the Castagnoli check value).
        byte[] check = "123456789"u8.ToArray();
        Assert.That(~RefCrc32CUpdate(0xFFFF_FFFFu, check), Is.EqualTo(0xE306_9283u), "because the reference table must be CRC32C");
    }

    [TestCaseSource(nameof(Crcs))]
    public void Checksum_matches_the_documented_definition_for_every_crc_implementation(string crc)
    {
        PageOpsCrc c = Enum.Parse<PageOpsCrc>(crc);
        var rng = new Random(6);
        byte* p = PageA(0);
        Page(p).Clear();
        Assert.That(PageOps.Checksum(p, c), Is.EqualTo(RefChecksum(p)), "because the zero page checksums as defined");
        for (int round = 0; round < 200; round++)
        {
            Randomize(rng, p);
            Assert.That(PageOps.Checksum(p, c), Is.EqualTo(RefChecksum(p)), $"because a random page checksums as defined (round {round})");
        }
    }

    [Test]
    public void Checksum_is_the_same_for_every_crc_implementation_and_the_public_method()
    {
        var rng = new Random(7);
        byte* p = PageA(0);
        for (int round = 0; round < 100; round++)
        {
            Randomize(rng, p);
            uint expected = PageOps.Checksum(p);
            foreach (PageOpsCrc c in Enum.GetValues<PageOpsCrc>().Where(PageOps.IsSupported))
                Assert.That(PageOps.Checksum(p, c), Is.EqualTo(expected), $"because {c} must agree with the public method");
        }
    }

    [TestCaseSource(nameof(Crcs))]
    public void Checksum_is_equal_for_equal_pages_and_changes_with_every_single_bit_for_every_crc_implementation(string crc)
    {
        PageOpsCrc c = Enum.Parse<PageOpsCrc>(crc);
        var rng = new Random(8);
        byte* a = PageA(0), b = PageB(17);
        Randomize(rng, a);
        Page(a).CopyTo(Page(b));
        uint original = PageOps.Checksum(a, c);
        Assert.That(PageOps.Checksum(b, c), Is.EqualTo(original), "because equal pages (at different addresses) checksum equal");
        for (int bit = 0; bit < PageSize * 8; bit++)
        {
            b[bit >> 3] ^= (byte)(1 << (bit & 7));
            Assert.That(PageOps.Checksum(b, c), Is.Not.EqualTo(original), $"because flipping bit {bit} must change the checksum");
            b[bit >> 3] ^= (byte)(1 << (bit & 7));
        }
        Assert.That(PageOps.Checksum(b, c), Is.EqualTo(original), "because every flip was undone");
    }

    [TestCaseSource(nameof(Crcs))]
    public void Checksum64_matches_its_definition_and_changes_with_every_single_bit(string crc)
    {
        PageOpsCrc c = Enum.Parse<PageOpsCrc>(crc);
        var rng = new Random(16);
        byte* p = PageA(0);
        Page(p).Clear();
        Assert.That(PageOps.Checksum64(p, c), Is.EqualTo(RefChecksum64(p)), "because the zero page checksums as defined");
        for (int round = 0; round < 50; round++)
        {
            Randomize(rng, p);
            Assert.That(PageOps.Checksum64(p, c), Is.EqualTo(RefChecksum64(p)), $"because a random page checksums as defined (round {round})");
            Assert.That(PageOps.Checksum64(p), Is.EqualTo(PageOps.Checksum64(p, c)), "because the public method agrees");
        }
        ulong original = PageOps.Checksum64(p, c);
        for (int bit = 0; bit < PageSize * 8; bit += 7)
        {
            p[bit >> 3] ^= (byte)(1 << (bit & 7));
            Assert.That(PageOps.Checksum64(p, c), Is.Not.EqualTo(original), $"because flipping bit {bit} must change the checksum");
            p[bit >> 3] ^= (byte)(1 << (bit & 7));
        }
    }

    [TestCaseSource(nameof(Crcs))]
    public void Checksum_distinguishes_pages_whose_words_trade_places_between_streams(string crc)
    {
        PageOpsCrc c = Enum.Parse<PageOpsCrc>(crc);
        var rng = new Random(9);
        byte* a = PageA(0), b = PageB(0);
        for (int round = 0; round < 100; round++)
        {
            Randomize(rng, a);
            Page(a).CopyTo(Page(b));
            // Swap two adjacent words, which belong to different streams.
            int word = rng.Next(PageSize / 8 - 1);
            new Span<byte>(a + 8 * word, 8).CopyTo(new Span<byte>(b + 8 * (word + 1), 8));
            new Span<byte>(a + 8 * (word + 1), 8).CopyTo(new Span<byte>(b + 8 * word, 8));
            Assert.That(PageOps.Checksum(b, c), Is.Not.EqualTo(PageOps.Checksum(a, c)), $"because words {word} and {word + 1} traded places");
        }
    }

    [Test]
    public void Checksum_is_the_documented_fold_and_not_the_plain_crc32c_of_the_page()
    {
        var rng = new Random(16);
        byte* p = PageA(0);
        for (int round = 0; round < 20; round++)
        {
            Randomize(rng, p);
            uint plain = ~RefCrc32CUpdate(0xFFFF_FFFFu, Page(p));
            Assert.That(PageOps.Checksum(p), Is.EqualTo(RefChecksum(p)), "because the checksum follows its definition");
            Assert.That(PageOps.Checksum(p), Is.Not.EqualTo(plain), "because the streams and fold make it differ from CRC32C of the page");
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Copy and Zero
    // ------------------------------------------------------------------------------------------------

    [TestCaseSource(nameof(Widths))]
    public void Copy_copies_exactly_the_page_and_nothing_around_it_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(10);
        foreach (int offset in Offsets)
        {
            ResetGuards();
            byte* src = PageA(offset), dst = PageB((offset * 7 + 3) % 64);
            Randomize(rng, src);
            PageOps.Copy(dst, src, w);
            Assert.That(Page(dst).SequenceEqual(Page(src)), Is.True, $"because the destination must equal the source (src offset {offset})");
            AssertGuardsIntact(_bufB, dst, $"Copy (dst offset {(offset * 7 + 3) % 64})");
            AssertGuardsIntact(_bufA, src, $"Copy source (offset {offset})");
        }
    }

    [TestCaseSource(nameof(Widths))]
    public void Zero_clears_exactly_the_page_and_nothing_around_it_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(11);
        foreach (int offset in Offsets)
        {
            ResetGuards();
            byte* p = PageA(offset);
            Randomize(rng, p);
            PageOps.Zero(p, w);
            Assert.That(RefIsZero(p), Is.True, $"because every byte of the page must be zero (offset {offset})");
            AssertGuardsIntact(_bufA, p, $"Zero (offset {offset})");
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Unaligned pointers, for the read kernels
    // ------------------------------------------------------------------------------------------------

    [TestCaseSource(nameof(Widths))]
    public void Read_kernels_handle_unaligned_pages_for_every_width(string width)
    {
        PageOpsWidth w = Enum.Parse<PageOpsWidth>(width);
        var rng = new Random(12);
        foreach (int offsetA in Offsets)
        {
            ResetGuards();
            int offsetB = (offsetA * 13 + 5) % 64;
            byte* a = PageA(offsetA), b = PageB(offsetB);
            string where = $"(offsets {offsetA} and {offsetB})";

            Randomize(rng, a);
            Page(a).CopyTo(Page(b));
            Assert.That(PageOps.PageEquals(a, b, w), Is.True, $"because equal unaligned pages are equal {where}");
            Assert.That(PageOps.Compare(a, b, w), Is.Zero, $"because equal unaligned pages compare equal {where}");

            int i = rng.Next(PageSize);
            b[i] = (byte)(a[i] ^ 0x80);
            Assert.That(PageOps.PageEquals(a, b, w), Is.False, $"because the pages differ at byte {i} {where}");
            Assert.That(PageOps.Compare(a, b, w), Is.EqualTo(RefCompare(a, b)), $"because the pages differ at byte {i} {where}");
            Assert.That(PageOps.Compare(b, a, w), Is.EqualTo(RefCompare(b, a)), $"because the pages differ at byte {i} {where}");

            Page(a).Clear();
            Assert.That(PageOps.IsZero(a, w), Is.True, $"because an unaligned zero page is zero {where}");
            a[PageSize - 1] = 1;
            Assert.That(PageOps.IsZero(a, w), Is.False, $"because the last byte of the unaligned page is set {where}");
            a[PageSize - 1] = 0;
            a[0] = 1;
            Assert.That(PageOps.IsZero(a, w), Is.False, $"because the first byte of the unaligned page is set {where}");

            AssertGuardsIntact(_bufA, a, $"unaligned reads {where}");
        }
    }

    [TestCaseSource(nameof(Crcs))]
    public void Checksum_handles_unaligned_pages_for_every_crc_implementation(string crc)
    {
        PageOpsCrc c = Enum.Parse<PageOpsCrc>(crc);
        var rng = new Random(13);
        foreach (int offset in Offsets)
        {
            byte* p = PageA(offset);
            Randomize(rng, p);
            Assert.That(PageOps.Checksum(p, c), Is.EqualTo(RefChecksum(p)), $"because the checksum does not depend on alignment (offset {offset})");
        }
    }

    // ------------------------------------------------------------------------------------------------
    // Public API: pointer methods and span overloads
    // ------------------------------------------------------------------------------------------------

    [Test]
    public void Public_pointer_methods_match_the_references()
    {
        var rng = new Random(14);
        byte* a = PageA(0), b = PageB(0);
        for (int round = 0; round < 200; round++)
        {
            Randomize(rng, a);
            Page(a).CopyTo(Page(b));
            if (round % 2 == 1)
                b[rng.Next(PageSize)] ^= (byte)rng.Next(1, 256);
            Assert.That(PageOps.PageEquals(a, b), Is.EqualTo(RefEquals(a, b)), "because PageEquals matches the byte loop");
            Assert.That(PageOps.Compare(a, b), Is.EqualTo(RefCompare(a, b)), "because Compare matches memcmp");
            Assert.That(PageOps.Checksum(a), Is.EqualTo(RefChecksum(a)), "because Checksum matches its definition");
            Assert.That(PageOps.IsZero(a), Is.EqualTo(RefIsZero(a)), "because IsZero matches the byte loop");
        }
        PageOps.Copy(b, a);
        Assert.That(Page(b).SequenceEqual(Page(a)), Is.True, "because Copy copies the page");
        AssertGuardsIntact(_bufB, b, "public Copy");
        PageOps.Zero(b);
        Assert.That(RefIsZero(b), Is.True, "because Zero clears the page");
        Assert.That(PageOps.IsZero(b), Is.True, "because IsZero sees the cleared page");
        AssertGuardsIntact(_bufB, b, "public Zero");
    }

    [Test]
    public void Span_overloads_match_the_pointer_methods()
    {
        var rng = new Random(15);
        byte[] a = new byte[PageSize], b = new byte[PageSize];
        rng.NextBytes(a);
        a.CopyTo(b);
        b[1234] ^= 0x40;
        fixed (byte* pa = a)
        fixed (byte* pb = b)
        {
            Assert.That(PageOps.PageEquals(a, b), Is.EqualTo(PageOps.PageEquals(pa, pb)), "because the span overload pins and forwards");
            Assert.That(PageOps.Compare(a, b), Is.EqualTo(PageOps.Compare(pa, pb)), "because the span overload pins and forwards");
            Assert.That(PageOps.Compare(b, a), Is.EqualTo(PageOps.Compare(pb, pa)), "because the span overload pins and forwards");
            Assert.That(PageOps.Checksum(a), Is.EqualTo(PageOps.Checksum(pa)), "because the span overload pins and forwards");
            Assert.That(PageOps.IsZero(a), Is.False, "because a random page is not zero");
        }
        PageOps.Copy(b, a);
        Assert.That(b, Is.EqualTo(a), "because Copy(Span, ReadOnlySpan) copies the page");
        PageOps.Zero(b);
        Assert.That(b, Is.All.Zero, "because Zero(Span) clears the page");
        Assert.That(PageOps.IsZero(b), Is.True, "because IsZero(ReadOnlySpan) sees the cleared page");
    }

    [TestCase(0)]
    [TestCase(1)]
    [TestCase(PageSize - 1)]
    [TestCase(PageSize + 1)]
    [TestCase(2 * PageSize)]
    public void Span_overloads_reject_spans_that_are_not_exactly_one_page(int length)
    {
        byte[] page = new byte[PageSize];
        byte[] wrong = new byte[length];
        Assert.That(() => PageOps.PageEquals(wrong, page), Throws.ArgumentException, "because PageEquals needs a whole first page");
        Assert.That(() => PageOps.PageEquals(page, wrong), Throws.ArgumentException, "because PageEquals needs a whole second page");
        Assert.That(() => PageOps.Compare(wrong, page), Throws.ArgumentException, "because Compare needs a whole first page");
        Assert.That(() => PageOps.Compare(page, wrong), Throws.ArgumentException, "because Compare needs a whole second page");
        Assert.That(() => PageOps.IsZero(wrong), Throws.ArgumentException, "because IsZero needs a whole page");
        Assert.That(() => PageOps.Checksum(wrong), Throws.ArgumentException, "because Checksum needs a whole page");
        Assert.That(() => PageOps.Copy(wrong, page), Throws.ArgumentException, "because Copy needs a whole destination page");
        Assert.That(() => PageOps.Copy(page, wrong), Throws.ArgumentException, "because Copy needs a whole source page");
        Assert.That(() => PageOps.Zero(wrong), Throws.ArgumentException, "because Zero needs a whole page");
        Assert.That(wrong, Is.All.Zero, "because a rejected call must not write");
    }

    [Test]
    public void Implementation_names_the_width_and_crc_in_use()
    {
        string name = PageOps.Implementation;
        TestContext.Out.WriteLine($"PageOps.Implementation = {name}");
        foreach (PageOpsWidth w in Enum.GetValues<PageOpsWidth>())
            TestContext.Out.WriteLine($"  {w}: {(PageOps.IsHardwareAccelerated(w) ? "hardware" : "emulated")}");
        Assert.That(name, Does.Contain("CRC32C"), "because the report names the checksum");
        Assert.That(PageOps.IsHardwareAccelerated(PageOps.BestWidth), Is.True, "because the public kernels use an accelerated width");
    }

    // ------------------------------------------------------------------------------------------------
    // Helpers and references
    // ------------------------------------------------------------------------------------------------

    /// <summary>Fills both buffers with the guard byte, erasing pages placed at earlier offsets.</summary>
    private void ResetGuards()
    {
        new Span<byte>(_bufA, BufferSize).Fill(Guard);
        new Span<byte>(_bufB, BufferSize).Fill(Guard);
    }

    private byte* PageA(int offset) => _bufA + PageSize + offset;

    private byte* PageB(int offset) => _bufB + PageSize + offset;

    private static Span<byte> Page(byte* p) => new(p, PageSize);

    private static void Randomize(Random rng, byte* p) => rng.NextBytes(Page(p));

    private static void AssertGuardsIntact(byte* buffer, byte* page, string what)
    {
        int before = (int)(page - buffer);
        int after = BufferSize - before - PageSize;
        Assert.That(new Span<byte>(buffer, before).IndexOfAnyExcept(Guard), Is.EqualTo(-1), $"because {what} must not write before the page");
        Assert.That(new Span<byte>(page + PageSize, after).IndexOfAnyExcept(Guard), Is.EqualTo(-1), $"because {what} must not write after the page");
    }

    private static bool RefEquals(byte* a, byte* b)
    {
        for (int i = 0; i < PageSize; i++)
        {
            if (a[i] != b[i])
                return false;
        }
        return true;
    }

    private static int RefCompare(byte* a, byte* b)
    {
        for (int i = 0; i < PageSize; i++)
        {
            if (a[i] != b[i])
                return a[i] < b[i] ? -1 : 1;
        }
        return 0;
    }

    private static bool RefIsZero(byte* p)
    {
        for (int i = 0; i < PageSize; i++)
        {
            if (p[i] != 0)
                return false;
        }
        return true;
    }

    private static readonly uint[] Crc32CTable = BuildCrc32CTable();

    private static uint[] BuildCrc32CTable()
    {
        var table = new uint[256];
        for (uint n = 0; n < 256; n++)
        {
            uint c = n;
            for (int k = 0; k < 8; k++)
                c = (c & 1) != 0 ? 0x82F6_3B78u ^ (c >> 1) : c >> 1;
            table[n] = c;
        }
        return table;
    }

    /// <summary>The raw (uninverted) CRC32C register update over <paramref name="data"/>, one byte at a time.</summary>
    private static uint RefCrc32CUpdate(uint crc, ReadOnlySpan<byte> data)
    {
        foreach (byte d in data)
            crc = Crc32CTable[(crc ^ d) & 0xFF] ^ (crc >> 8);
        return crc;
    }

    /// <summary>The 64-bit checksum exactly as documented on <see cref="PageOps.Checksum64(byte*)"/>.</summary>
    private static ulong RefChecksum64(byte* p)
    {
        Span<byte> stream = stackalloc byte[PageSize / 4];
        Span<byte> fold = stackalloc byte[16];
        for (int k = 0; k < 4; k++)
        {
            for (int j = 0; j < PageSize / 8 / 4; j++)
                new ReadOnlySpan<byte>(p + 8 * (4 * j + k), 8).CopyTo(stream.Slice(8 * j, 8));
            uint s = RefCrc32CUpdate(0xFFFF_FFFFu, stream);
            for (int b = 0; b < 4; b++)
                fold[k * 4 + b] = (byte)(s >> (8 * b));
        }
        uint hi = RefCrc32CUpdate(0xFFFF_FFFFu, fold[..8]);
        uint lo = RefCrc32CUpdate(0xFFFF_FFFFu, fold[8..]);
        return ~((ulong)hi << 32 | lo);
    }

    /// <summary>The checksum exactly as documented on <see cref="PageOps.Checksum(byte*)"/>, byte by byte.</summary>
    private static uint RefChecksum(byte* p)
    {
        // Stream k takes the 8-byte words k, k+4, k+8, ...: gather its 1024 bytes, then CRC them.
        Span<byte> stream = stackalloc byte[PageSize / 4];
        Span<byte> fold = stackalloc byte[16];
        for (int k = 0; k < 4; k++)
        {
            for (int j = 0; j < PageSize / 8 / 4; j++)
                new ReadOnlySpan<byte>(p + 8 * (4 * j + k), 8).CopyTo(stream.Slice(8 * j, 8));
            uint s = RefCrc32CUpdate(0xFFFF_FFFFu, stream);
            // le64(s[0] | s[1] << 32) then le64(s[2] | s[3] << 32): the stream values' little-endian bytes in order.
            for (int b = 0; b < 4; b++)
                fold[k * 4 + b] = (byte)(s >> (8 * b));
        }
        return ~RefCrc32CUpdate(0xFFFF_FFFFu, fold);
    }
}
